"""Actor: generation masks, log-prob agreement with sampling, padding invariance, LoRA, export."""

import logging
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import lit_rlhf.models.actor as actor_module
from lit_rlhf.models import (
    Actor,
    GenerationSettings,
    LoadSettings,
    LoraSettings,
    load_tokenizer,
)


@pytest.fixture
def actor(tiny_paths, tokenizer):
    return Actor.from_pretrained(tiny_paths["policy"], tokenizer)


def prompts(tokenizer, texts=("1+2=", "12+34=", "7+7=")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_a_row_ends_at_its_own_stop_token_and_its_mask_is_what_it_sampled(actor, tokenizer, monkeypatch):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    steps = iter(torch.tensor([[9, 9, 9], [5, 5, 5], [6, 6, 6], [eos, 7, 7]]))  # one row per step
    monkeypatch.setattr(actor_module, "sample_tokens", lambda logits, settings, generator: next(steps))
    stop = torch.tensor([[5, -1], [6, 8], [-1, -1]])  # row 0 ends at 5, row 1 at 6, row 2 only at EOS
    out = actor.generate(*prompts(tokenizer), GenerationSettings(max_new_tokens=4), stop_token_ids=stop, compact=False)
    assert out.sequences[:, -4:].tolist() == [[9, 5, pad, pad], [9, 5, 6, pad], [9, 5, 6, 7]]
    assert out.loss_mask.long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert out.finished.tolist() == [True, True, False]
    assert (out.log_probs[~out.loss_mask] == 0).all() and (out.log_probs[out.loss_mask] < 0).all()
    # the same ids for every row from the settings
    steps = iter(torch.tensor([[9, 9, 9], [5, 4, 4], [4, 5, 4]]))
    out = actor.generate(*prompts(tokenizer), GenerationSettings(max_new_tokens=3, stop_token_ids=(5,)), compact=False)
    assert out.loss_mask.long().tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert out.finished.tolist() == [True, True, False]


def test_generate_masks_with_eos_mid_response_and_left_padding(actor, tokenizer, monkeypatch):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    steps = iter(torch.tensor([[5, 5, eos], [eos, 6, 6], [7, 7, 7], [8, 8, 8]]))  # one row per step
    monkeypatch.setattr(actor_module, "sample_tokens", lambda logits, settings, generator: next(steps))
    input_ids, attention_mask = prompts(tokenizer)
    assert attention_mask[0, 0] == 0, "the short prompt must be left-padded"
    out = actor.generate(input_ids, attention_mask, GenerationSettings(max_new_tokens=4, stop_at_eos=False))
    responses = out.sequences[:, input_ids.shape[1] :]
    # row 0: 5 eos | pad pad ; row 1: 5 6 7 8 ; row 2: eos | pad pad pad
    assert responses.tolist() == [[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad]]
    assert out.loss_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert torch.equal(out.attention_mask, torch.cat([attention_mask, out.loss_mask.long()], 1))
    assert torch.equal(out.sequences[:, : input_ids.shape[1]], input_ids)


def test_generate_stops_when_every_row_ended(actor, tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    calls = []
    monkeypatch.setattr(actor_module, "sample_tokens", lambda logits, s, g: calls.append(1) or torch.full((3,), eos))
    out = actor.generate(*prompts(tokenizer), GenerationSettings(max_new_tokens=10))
    assert len(calls) == 1 and out.loss_mask.shape == (3, 1)


def test_pad_equal_to_eos_keeps_first_eos(tiny_paths, tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    actor = Actor(Actor.from_pretrained(tiny_paths["policy"], tokenizer).model, [eos], pad_token_id=eos)
    steps = iter(torch.tensor([[5, eos], [eos, 6], [7, eos]]))  # one row per decoding step
    monkeypatch.setattr(actor_module, "sample_tokens", lambda logits, s, g: next(steps))
    out = actor.generate(*prompts(tokenizer, ("1+2=", "3+4=")), GenerationSettings(max_new_tokens=3, stop_at_eos=False))
    assert out.sequences[:, -3:].tolist() == [[5, eos, eos], [eos, eos, eos]]
    assert out.loss_mask.tolist() == [[True, True, False], [True, False, False]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_log_probs_match_generation_scores(actor, tokenizer, temperature):
    input_ids, attention_mask = prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=6, temperature=temperature, stop_at_eos=False)
    out = actor.generate(input_ids, attention_mask, settings)
    log_probs = actor(out.sequences, out.attention_mask, num_actions=6, temperature=temperature)
    mask = out.loss_mask
    torch.testing.assert_close(log_probs[mask], out.log_probs[mask], atol=1e-4, rtol=0)


def test_forward_matches_transformers_generate_scores(actor, tokenizer):
    """Sample with transformers' own generate; our forward reproduces log_softmax(scores)."""
    input_ids, attention_mask = prompts(tokenizer)
    torch.manual_seed(0)
    hf = actor.model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=0.8,
        top_k=0,
        top_p=1.0,
        max_new_tokens=5,
        min_new_tokens=5,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    responses = hf.sequences[:, input_ids.shape[1] :]
    expected = torch.stack([s.log_softmax(-1) for s in hf.scores], 1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    full_mask = torch.cat([attention_mask, torch.ones_like(responses)], 1)
    ours = actor(hf.sequences, full_mask, num_actions=5, temperature=0.8)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def filtered_probs(logits, temperature, top_k, top_p):
    """The distribution to sample from, written out: softmax(z / T) restricted to top-k, then to top-p."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    kept = torch.zeros_like(probs, dtype=torch.bool)
    kept[order[:top_k]] = True
    probs = torch.where(kept, probs, 0.0) / probs[kept].sum()
    cumulative, total = 0.0, torch.zeros_like(probs)
    for i in order.tolist():  # the smallest set of most likely tokens whose mass reaches top_p
        if probs[i] == 0 or cumulative >= top_p:
            break
        total[i], cumulative = probs[i], cumulative + probs[i].item()
    return total / total.sum()


def test_the_sampler_draws_from_the_same_distribution_as_transformers_generate(actor, tokenizer):
    """Not HF's token stream (one uniform per row instead of torch.multinomial), but its distribution."""
    n, settings = 6000, GenerationSettings(max_new_tokens=1, temperature=0.9, top_k=5, top_p=0.9)
    enc = tokenizer(["12+34="] * n, return_tensors="pt")
    with torch.no_grad():
        logits = actor.model(enc.input_ids[:1]).logits[0, -1]
    expected = filtered_probs(logits, 0.9, 5, 0.9)
    ours = actor.generate(enc.input_ids, enc.attention_mask, settings, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    hf = actor.model.generate(
        **enc, do_sample=True, temperature=0.9, top_k=5, top_p=0.9, max_new_tokens=1, pad_token_id=0
    )
    for tokens in (ours.sequences[:, -1], hf[:, -1]):
        frequencies = torch.bincount(tokens, minlength=len(expected)).float() / n
        assert 0.5 * (frequencies - expected).abs().sum() < 0.03  # total variation; sampling noise ~0.01
        assert not frequencies[expected == 0].any(), "filtered-out tokens are never drawn"


def test_dropping_finished_rows_changes_no_row_and_stops_paying_for_them(actor, tokenizer, monkeypatch):
    monkeypatch.setattr(actor_module, "RESPONSE_ROOM", 2)  # the KV cache grows 2 -> 4 -> 8 -> 12 on the way
    input_ids, attention_mask = prompts(tokenizer, ("1+2=", "3+4=", "55+66=", "9-1=") * 4)
    settings = GenerationSettings(max_new_tokens=12, temperature=1.5)
    batch_sizes = []
    forward = actor.model.forward

    def counting(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    outputs = {}
    for compact in (False, True):
        batch_sizes.clear()
        monkeypatch.setattr(actor.model, "forward", counting)
        outputs[compact] = (
            actor.generate(input_ids, attention_mask, settings, torch.Generator().manual_seed(5), compact=compact),
            list(batch_sizes),
        )
    (plain, plain_sizes), (compacted, sizes) = outputs[False], outputs[True]
    assert (plain.sequences == tokenizer.eos_token_id).any(1).sum() >= 4, (
        "rows must finish early for this to mean anything"
    )
    assert torch.equal(compacted.sequences, plain.sequences) and torch.equal(compacted.loss_mask, plain.loss_mask)
    torch.testing.assert_close(
        compacted.log_probs[plain.loss_mask], plain.log_probs[plain.loss_mask], atol=1e-5, rtol=0
    )
    assert set(plain_sizes) == {16} and min(sizes) < 16 and sum(sizes) < sum(plain_sizes), (sizes, plain_sizes)
    # the log-probs the compacted sampler reports are the model's own: the right rows stayed in the cache
    forward_log_probs = actor(compacted.sequences, compacted.attention_mask, compacted.loss_mask.shape[1], 1.5)
    mask = compacted.loss_mask
    torch.testing.assert_close(forward_log_probs[mask], compacted.log_probs[mask], atol=1e-4, rtol=0)


def test_the_ready_decode_mask_gives_the_same_tokens_as_the_2d_mask(actor, tokenizer, monkeypatch):
    """With sdpa the sampler hands the model its own 4D key mask (no per-step mask building): left
    padding, growing cache and dropped rows included, every token and log-prob is the 2D mask's."""
    monkeypatch.setattr(actor_module, "RESPONSE_ROOM", 2)
    input_ids, attention_mask = prompts(tokenizer, ("1+2=", "3+4=", "55+66=", "9-1=") * 4)
    settings = GenerationSettings(max_new_tokens=12, temperature=1.5)
    masks = []
    forward = actor.model.forward

    def recording(*args, **kwargs):
        masks.append(kwargs["attention_mask"].dim())
        return forward(*args, **kwargs)

    monkeypatch.setattr(actor.model, "forward", recording)
    assert actor_module.takes_decode_mask(actor.model.config)
    ready = actor.generate(input_ids, attention_mask, settings, torch.Generator().manual_seed(5))
    assert masks[0] == 2 and set(masks[1:]) == {4}, "the prefill builds its causal mask, decode steps do not"
    monkeypatch.setattr(actor_module, "takes_decode_mask", lambda config: False)
    plain = actor.generate(input_ids, attention_mask, settings, torch.Generator().manual_seed(5))
    assert (plain.sequences == tokenizer.eos_token_id).any(1).sum() >= 4, "rows finish early: rows are dropped"
    assert torch.equal(ready.sequences, plain.sequences)
    torch.testing.assert_close(ready.log_probs, plain.log_probs, atol=1e-6, rtol=0)


def test_the_ready_decode_mask_is_only_for_sdpa_without_sliding_windows(actor):
    import copy

    config = copy.deepcopy(actor.model.config)
    assert actor_module.takes_decode_mask(config)
    config.sliding_window = 4
    assert not actor_module.takes_decode_mask(config), "a sliding window needs transformers' own mask"
    config.sliding_window, config.layer_types = None, ["full_attention", "sliding_attention"]
    assert not actor_module.takes_decode_mask(config)
    config.layer_types = None
    config._attn_implementation = "eager"  # eager adds a float mask: a boolean one would be wrong
    assert not actor_module.takes_decode_mask(config)


def test_generation_inside_mixed_precision_runs_in_the_weights_dtype(actor, tokenizer):
    # validation runs inside autocast: the sampler must neither crash nor change its tokens there
    enc = tokenizer(["12+34=", "5+6="], return_tensors="pt", padding=True)
    settings = GenerationSettings(max_new_tokens=40, stop_at_eos=False)
    plain = actor.generate(enc.input_ids, enc.attention_mask, settings, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = actor.generate(enc.input_ids, enc.attention_mask, settings, torch.Generator().manual_seed(0))
    assert torch.equal(plain.sequences, mixed.sequences) and mixed.log_probs.dtype == torch.float32


def test_log_probs_do_not_depend_on_left_padding(actor, tokenizer):
    seq = torch.tensor([[1, 5, 4, 6, 11, 7, 8, 2]])
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(seq)], 1)
    plain = actor(seq, torch.ones_like(seq), num_actions=3)
    shifted = actor(padded, mask, num_actions=3)
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=1e-5)


def test_dropout_is_disabled_so_train_mode_is_deterministic(actor, tokenizer):
    actor.train()
    seq = torch.tensor([[1, 5, 4, 6, 11, 7]])
    assert torch.equal(actor(seq, torch.ones_like(seq), 3), actor(seq, torch.ones_like(seq), 3))


def test_lora_trains_only_adapters_and_disabled_adapter_is_the_base(tiny_paths, tokenizer):
    settings = LoadSettings(lora=LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    actor = Actor.from_pretrained(tiny_paths["policy"], tokenizer, settings)
    trainable = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter matter (lora_B starts at zero)
        for n, p in actor.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    base = Actor.from_pretrained(tiny_paths["policy"], tokenizer)
    seq = torch.tensor([[1, 5, 4, 6, 11, 7, 8, 2]])
    mask = torch.ones_like(seq)
    with actor.adapter_disabled():
        disabled = actor(seq, mask, 4)
    torch.testing.assert_close(disabled, base(seq, mask, 4), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(actor(seq, mask, 4), disabled, atol=1e-3)


def test_adapter_disabled_requires_lora(actor):
    with pytest.raises(RuntimeError, match="LoRA"), actor.adapter_disabled():
        pass


def test_save_load_round_trip_plain_merged_and_adapter(tiny_paths, tokenizer, tmp_path):
    seq = torch.tensor([[1, 5, 4, 6, 11, 7, 8, 2]])
    mask = torch.ones_like(seq)
    plain = Actor.from_pretrained(tiny_paths["policy"], tokenizer)
    with torch.no_grad():
        plain.model.lm_head.weight.add_(0.1)
    plain.save_pretrained(str(tmp_path / "plain"), tokenizer=tokenizer)
    assert torch.equal(Actor.from_pretrained(str(tmp_path / "plain"), tokenizer)(seq, mask, 4), plain(seq, mask, 4))

    lora = Actor.from_pretrained(tiny_paths["policy"], tokenizer, LoadSettings(lora=LoraSettings(rank=4)))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    expected = lora(seq, mask, 4)
    lora.save_pretrained(str(tmp_path / "merged"), merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(Actor(merged, [2], 0)(seq, mask, 4), expected, atol=1e-5, rtol=1e-5)
    assert lora.has_adapter, "merging for export must not unload the live adapter"
    lora.save_pretrained(str(tmp_path / "adapter"), merge_lora=False)
    reloaded = Actor.from_pretrained(str(tmp_path / "adapter"), tokenizer)
    assert reloaded.has_adapter
    torch.testing.assert_close(reloaded(seq, mask, 4), expected, atol=1e-6, rtol=1e-6)


def test_missing_path_is_named(tokenizer):
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        Actor.from_pretrained("/no/such/model", tokenizer)
    with pytest.raises(FileNotFoundError, match="./missing-dir"):
        load_tokenizer("./missing-dir")


def test_tokenizer_without_pad_gets_eos(tiny_paths, tmp_path, caplog):
    tok = load_tokenizer(tiny_paths["policy"])
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token == "<eos>"
    assert reloaded.padding_side == "left"
    assert "no pad token" in caplog.text


def test_generation_settings_validate():
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_suppressed_tokens_are_never_sampled(actor, tokenizer):
    input_ids, attention_mask = prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=12, temperature=5.0, suppress_token_ids=(0, 1, 2), stop_at_eos=False)
    out = actor.generate(input_ids.repeat(8, 1), attention_mask.repeat(8, 1), settings)
    responses = out.sequences[:, input_ids.shape[1] :]
    assert not torch.isin(responses, torch.tensor([0, 1, 2])).any()
    assert out.loss_mask.all(), "without EOS every response runs to max_new_tokens"


def test_a_stop_string_ends_its_row_at_the_token_that_completes_it(actor, tokenizer, monkeypatch):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    four, five, six, one = (tokenizer.convert_tokens_to_ids(c) for c in "4561")
    # row 0 writes "456": "45" is complete after its 2nd token; row 1 "111" never; row 2 "4" then EOS
    steps = iter(torch.tensor([[four, one, four], [five, one, eos], [six, one, one]]))
    monkeypatch.setattr(actor_module, "sample_tokens", lambda logits, s, g: next(steps))
    input_ids, attention_mask = prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=3, stop_strings=("45",))
    out = actor.generate(input_ids, attention_mask, settings, compact=False)  # the fake sampler fills every row
    responses = out.sequences[:, input_ids.shape[1] :]
    assert responses.tolist() == [[four, five, pad], [one, one, one], [four, eos, pad]]
    assert out.loss_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0]]
    assert out.finished.tolist() == [True, False, True]  # stopped, cut at max_new_tokens, EOS
    assert torch.equal(out.attention_mask, torch.cat([attention_mask, out.loss_mask.long()], 1))
    # the text the rewards read (the decode of the kept ids) holds the stop string
    texts = tokenizer.batch_decode(responses.masked_fill(~out.loss_mask, pad), skip_special_tokens=True)
    assert texts == ["45", "111", "4"]
    # the kept tokens' log-probs are the policy's
    scored = actor(out.sequences, out.attention_mask, 3)
    torch.testing.assert_close(out.log_probs[out.loss_mask], scored[out.loss_mask], atol=1e-5, rtol=0)


def test_stop_strings_cut_rows_that_hold_them_and_leave_the_others_alone(actor, tokenizer):
    input_ids, attention_mask = prompts(tokenizer, ("1+2=", "12+34=", "7+7=", "5+5=") * 4)
    settings = GenerationSettings(
        max_new_tokens=8, stop_at_eos=False, suppress_token_ids=(tokenizer.eos_token_id, tokenizer.pad_token_id)
    )
    plain = actor.generate(input_ids, attention_mask, settings, torch.Generator().manual_seed(3))
    stopped = actor.generate(
        input_ids, attention_mask, replace(settings, stop_strings=("1", "+=")), torch.Generator().manual_seed(3)
    )
    width = input_ids.shape[1]
    hits = 0
    for row in range(len(input_ids)):
        ids = plain.sequences[row, width:].tolist()
        texts = [tokenizer.decode(ids[: end + 1], skip_special_tokens=True) for end in range(len(ids))]
        stop = next((end for end, text in enumerate(texts) if "1" in text or "+=" in text), None)
        kept = stopped.loss_mask[row].sum().item()
        if stop is None:  # unaffected: the same tokens and log-probs, still cut at max_new_tokens
            assert kept == 8 and stopped.sequences[row, width:].tolist() == ids and not stopped.finished[row]
        else:  # exactly the sampled ids up to the token that completed the stop string
            hits += 1
            assert kept == stop + 1 and stopped.finished[row], (row, texts)
            assert stopped.sequences[row, width : width + kept].tolist() == ids[:kept]
        torch.testing.assert_close(stopped.log_probs[row, :kept], plain.log_probs[row, :kept], atol=1e-6, rtol=0)
    assert 0 < hits < len(input_ids)  # both kinds of rows were seen


def test_stop_strings_need_the_tokenizer(tiny_paths, tokenizer):
    bare = Actor(Actor.from_pretrained(tiny_paths["policy"], tokenizer).model, [tokenizer.eos_token_id], 0)
    with pytest.raises(ValueError, match="generation.stop_strings needs the policy's tokenizer"):
        bare.generate(*prompts(tokenizer), GenerationSettings(max_new_tokens=2, stop_strings=("1",)))
    assert GenerationSettings(stop_strings="\n").stop_strings == ("\n",)
    with pytest.raises(ValueError, match="generation.stop_strings"):
        GenerationSettings(stop_strings=("",))
