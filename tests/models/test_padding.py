"""Padding-free forwards: trimmed and packed forwards give the padded forward's log-probs and values."""

import pytest
import torch

from lit_rlhf.functional import log_probs_from_logits
from lit_rlhf.models import Actor, ValueModel, padding
from lit_rlhf.models.padding import SHARED_PREFIX_MIN, pack_rows, shared_prefix, unpack, valid_window


def test_valid_window_drops_columns_that_are_padding_in_every_row():
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]])
    assert valid_window(mask) == (2, 7)
    # with 4 actions the column before them (index 3) and one action column are kept
    assert valid_window(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]]), 4) == (1, 5)
    assert valid_window(torch.zeros(2, 5, dtype=torch.long)) == (0, 5)
    assert valid_window(torch.ones(3, 6, dtype=torch.long), 2) == (0, 6)


def test_pack_rows_positions_restart_per_row_and_unpack_inverts():
    seq = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    packed = pack_rows(seq, mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert packed.index.tolist() == [[-1, -1, 0, 1, 2], [3, 4, 5, 6, -1]]
    values = packed.input_ids[0].float() * 10
    assert unpack(values, packed.index).tolist() == [[0, 0, 50, 60, 70], [80, 90, 100, 110, 0]]


def rollout_batch(tokenizer, num_actions=7, extra_left=2, extra_right=3):
    """Left-padded prompts + right-padded responses ending at different lengths, with whole columns
    of padding on both sides (as a micro-batch of a larger rollout has)."""
    enc = tokenizer(["1+2=", "12+34=", "7+7=", "40-3="], return_tensors="pt", padding=True)
    rows, prompt_len = enc.input_ids.shape
    gen = torch.Generator().manual_seed(0)
    responses = torch.randint(3, len(tokenizer), (rows, num_actions), generator=gen)
    lengths = torch.tensor([num_actions - extra_right, 2, 1, num_actions - extra_right - 1])
    loss_mask = torch.arange(num_actions) < lengths.unsqueeze(1)
    responses = torch.where(loss_mask, responses, tokenizer.pad_token_id)
    pad = torch.full((rows, extra_left), tokenizer.pad_token_id)
    sequences = torch.cat([pad, enc.input_ids, responses], 1)
    attention_mask = torch.cat([torch.zeros_like(pad), enc.attention_mask, loss_mask.long()], 1)
    return sequences, attention_mask, loss_mask


def alone(sequences, attention_mask, fn):
    """``fn(valid_tokens [1, n])`` for each row on its own, without any padding."""
    return [fn(s[m.bool()].unsqueeze(0)) for s, m in zip(sequences, attention_mask, strict=True)]


@pytest.mark.parametrize("padding_free", [False, True])
def test_actor_log_probs_and_gradients_equal_the_unpadded_rows(tiny_paths, tokenizer, padding_free):
    actor = Actor.from_pretrained(tiny_paths["policy"], tokenizer)
    sequences, attention_mask, loss_mask = rollout_batch(tokenizer)
    num_actions = loss_mask.shape[1]

    expected = []
    for row, tokens in enumerate(alone(sequences, attention_mask, lambda t: t)):
        n = int(loss_mask[row].sum())
        logits = actor.model(input_ids=tokens).logits[0, -n - 1 : -1]
        expected.append(log_probs_from_logits(logits, tokens[0, -n:]))
    widths = []
    record = lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape)  # noqa: E731
    hook = actor.model.register_forward_pre_hook(record, with_kwargs=True)
    actor.padding_free = padding_free
    log_probs = actor(sequences, attention_mask, num_actions)
    hook.remove()
    assert log_probs.shape == loss_mask.shape
    for row, want in enumerate(expected):
        torch.testing.assert_close(log_probs[row, loss_mask[row]], want, atol=1e-5, rtol=1e-5)
    # the forward never saw the all-padding columns (packed: not a single padding token)
    valid = int(attention_mask.sum())
    assert widths == [(1, valid)] if padding_free else widths == [(4, sequences.shape[1] - 2 - 3)]

    # gradients of a masked loss equal the plain padded forward's
    assert_gradients_of_the_plain_forward(actor, sequences, attention_mask, loss_mask, log_probs)


SHARED = "12+34=46 5+5=10 77+1=78 9+9=18 30+3=33 "  # 39 tokens every prompt starts with


def shared_batch(tokenizer, num_actions=6):
    """Prompts of different lengths that share their first 39 tokens, left-padded, with responses of
    different lengths right-padded (a rollout with a system prompt or the tools' schemas)."""
    enc = tokenizer([SHARED + t for t in ["1+2=", "40+", "3+", "99+1="]], return_tensors="pt", padding=True)
    gen = torch.Generator().manual_seed(1)
    responses = torch.randint(3, len(tokenizer), (4, num_actions), generator=gen)
    loss_mask = torch.arange(num_actions) < torch.tensor([6, 2, 4, 5]).unsqueeze(1)
    responses = torch.where(loss_mask, responses, tokenizer.pad_token_id)
    return torch.cat([enc.input_ids, responses], 1), torch.cat([enc.attention_mask, loss_mask.long()], 1), loss_mask


def test_shared_prefix_counts_the_first_tokens_of_every_row_up_to_the_first_actions_predictor(tokenizer):
    sequences, attention_mask, loss_mask = shared_batch(tokenizer)
    starts = attention_mask.argmax(1)
    length, found = shared_prefix(sequences, attention_mask, loss_mask.shape[1])
    assert length == len(tokenizer(SHARED)["input_ids"]) >= SHARED_PREFIX_MIN and torch.equal(found, starts)
    assert shared_prefix(sequences[:1], attention_mask[:1], 6)[0] == 0, "one row shares nothing"
    other = sequences.clone()
    other[2, starts[2] + 5] = (other[2, starts[2] + 5] + 1) % len(tokenizer)
    assert shared_prefix(other, attention_mask, 6)[0] == 5
    # never past the token that predicts a row's first action: here the last prompt token of the longest prompt
    assert shared_prefix(sequences, attention_mask, sequences.shape[1] - int(starts.max()) - 3)[0] == 2


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_shared_prompt_prefix_runs_once_with_the_log_probs_and_gradients_of_the_full_forward(
    tiny_paths, tokenizer, padding_free
):
    actor = Actor.from_pretrained(tiny_paths["policy"], tokenizer)
    sequences, attention_mask, loss_mask = shared_batch(tokenizer)
    num_actions, prefix = loss_mask.shape[1], len(tokenizer(SHARED)["input_ids"])
    widths = []
    record = lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape))  # noqa: E731
    hook = actor.model.register_forward_pre_hook(record, with_kwargs=True)
    actor.padding_free = padding_free
    log_probs = actor(sequences, attention_mask, num_actions)
    hook.remove()
    # the prefix once, then each row's rest (its left padding stays, the actions end where they did)
    rest = int(attention_mask[:, :-num_actions].sum(1).max()) - prefix + num_actions
    assert widths == [(1, prefix), (4, rest)], "packing would run more tokens than the shared prefix"
    for row, tokens in enumerate(alone(sequences, attention_mask, lambda t: t)):
        n = int(loss_mask[row].sum())
        want = log_probs_from_logits(actor.model(input_ids=tokens).logits[0, -n - 1 : -1], tokens[0, -n:])
        torch.testing.assert_close(log_probs[row, loss_mask[row]], want, atol=1e-5, rtol=1e-5)
    assert_gradients_of_the_plain_forward(actor, sequences, attention_mask, loss_mask, log_probs)


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_critic_runs_a_shared_prompt_prefix_once_with_the_values_and_gradients_of_the_full_forward(
    tiny_paths, tokenizer, padding_free
):
    critic = ValueModel.from_pretrained(tiny_paths["reward"])
    sequences, attention_mask, loss_mask = shared_batch(tokenizer)
    num_actions, prefix = loss_mask.shape[1], len(tokenizer(SHARED)["input_ids"])
    widths = []
    record = lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1])  # noqa: E731
    backbone = critic.model.model
    hook = backbone.register_forward_pre_hook(record, with_kwargs=True)
    critic.padding_free = padding_free
    values, scores = critic(sequences, attention_mask, num_actions), critic.score(sequences, attention_mask)
    assert widths[0::2] == [prefix, prefix], "values and scores each ran the shared prefix once"
    hook.remove()
    critic.padding_free = False
    for row, tokens in enumerate(alone(sequences, attention_mask, lambda t: t)):
        n, ones = int(loss_mask[row].sum()), torch.ones_like(tokens)
        torch.testing.assert_close(values[row, loss_mask[row]], critic(tokens, ones, n)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores[row], critic.score(tokens, ones)[0], atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(torch.where(loss_mask, values, 0.0).sum(), list(critic.parameters()))
    with_prefix = padding.SHARED_PREFIX_MIN
    padding.SHARED_PREFIX_MIN = 10**9  # the plain padded forward
    try:
        plain = critic(sequences, attention_mask, num_actions)
    finally:
        padding.SHARED_PREFIX_MIN = with_prefix
    plain_grads = torch.autograd.grad(torch.where(loss_mask, plain, 0.0).sum(), list(critic.parameters()))
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def assert_gradients_of_the_plain_forward(actor, sequences, attention_mask, loss_mask, log_probs):
    """The gradients of a masked sum of ``log_probs`` equal those of the plain padded forward's."""
    num_actions = loss_mask.shape[1]
    grads = torch.autograd.grad(torch.where(loss_mask, log_probs, 0.0).sum(), list(actor.parameters()))
    plain = actor.model(input_ids=sequences, attention_mask=attention_mask, position_ids=_positions(attention_mask))
    plain_lp = log_probs_from_logits(plain.logits[:, -num_actions - 1 : -1], sequences[:, -num_actions:])
    plain_grads = torch.autograd.grad(torch.where(loss_mask, plain_lp, 0.0).sum(), list(actor.parameters()))
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("padding_free", [False, True])
def test_values_and_scores_equal_the_unpadded_rows(tiny_paths, tokenizer, padding_free):
    critic = ValueModel.from_pretrained(tiny_paths["reward"])
    sequences, attention_mask, loss_mask = rollout_batch(tokenizer)
    num_actions = loss_mask.shape[1]
    critic.padding_free = padding_free
    values = critic(sequences, attention_mask, num_actions)
    scores = critic.score(sequences, attention_mask)
    critic.padding_free = False
    for row, tokens in enumerate(alone(sequences, attention_mask, lambda t: t)):
        n, ones = int(loss_mask[row].sum()), torch.ones_like(tokens)
        want_values = critic(tokens, ones, n)[0]
        torch.testing.assert_close(values[row, loss_mask[row]], want_values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores[row], critic.score(tokens, ones)[0], atol=1e-5, rtol=1e-5)


def test_length_groups_sort_cut_at_rows_or_tokens_and_agree_on_a_count():
    from lit_rlhf.models.padding import length_groups

    lengths = torch.tensor([30, 5, 100, 7, 6, 31, 8, 29])
    groups = length_groups(lengths, max_rows=3)
    assert [g.tolist() for g in groups] == [[1, 4, 3], [6, 7, 0], [5, 2]]  # shortest first, 3 rows at most
    assert sorted(torch.cat(groups).tolist()) == list(range(8)), "every row once"
    by_tokens = length_groups(lengths, max_rows=8, max_tokens=100)
    for group in by_tokens:  # rows x longest row within budget, or a single (too long) row
        assert len(group) == 1 or len(group) * lengths[group].max() <= 100
    assert [lengths[g].tolist() for g in by_tokens] == [[5, 6, 7, 8], [29, 30, 31], [100]]
    agreed = length_groups(lengths, max_rows=8, max_tokens=100, count=5)
    assert len(agreed) == 5 and sorted(torch.cat(agreed).tolist()) == list(range(8))
    padded = sum(len(g) * lengths[g].max() for g in length_groups(lengths, 3))
    assert padded < 8 * lengths.max() / 2, "sorting cuts the padded work by more than half here"


def test_row_runs_group_consecutive_equal_lengths_and_skip_empty_rows():
    from lit_rlhf.models.padding import row_runs

    assert row_runs([3, 3, 0, 5, 5, 5, 2]).runs == [(0, 2, 3), (6, 3, 5), (21, 1, 2)]
    assert row_runs([4] * 64).runs == [(0, 64, 4)], "fixed-length rows: one attention call per layer"


def _packed_family_model(family, tokenizer, **extra):
    import transformers

    from tests.models.test_families import tiny_config

    config = tiny_config(family, tokenizer)
    for key, value in extra.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize(
    "family,extra",
    [("llama", {}), ("gpt2", {}), ("qwen2", {}), ("mistral", {"sliding_window": 3}), ("gemma", {})],
)
def test_packed_sdpa_forward_equals_each_row_alone(tokenizer, family, extra):
    """Every query sees only its own row (within a sliding window where the model has one), with one
    attention call per layer per run of equal-length rows, and no mask is built for the packed row."""
    from lit_rlhf.models.padding import RowRuns, pack_rows, packed_forward

    model = _packed_family_model(family, tokenizer, **extra)
    sequences, attention_mask, _ = rollout_batch(tokenizer)
    packed = pack_rows(sequences, attention_mask)
    seen = []
    original = RowRuns.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RowRuns, "__init__", spy)
        with torch.no_grad():
            logits = packed_forward(model, packed, attention_mask.sum(-1), use_cache=False).logits[0]
    assert model.config._attn_implementation == "sdpa", "the model's own setting is restored"
    layers = model.config.num_hidden_layers
    assert len(seen) == 1 and seen[0].calls == layers
    with torch.no_grad():
        want = torch.cat([model(input_ids=t).logits[0] for t in alone(sequences, attention_mask, lambda t: t)])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    if extra.get("sliding_window"):  # the window matters here: the block-causal answer differs
        model.config.sliding_window = None
        with torch.no_grad():
            unwindowed = packed_forward(model, packed, attention_mask.sum(-1), use_cache=False).logits[0]
        assert (unwindowed - want).abs().max() > 1e-3


def test_packed_forward_under_gradient_checkpointing_keeps_the_gradients(tiny_paths, tokenizer):
    """Recomputed layers run after the packed call returns: the checkpointed model keeps transformers'
    own packed path, and its gradients equal the plain packed forward's."""
    sequences, attention_mask, loss_mask = rollout_batch(tokenizer)
    num_actions = loss_mask.shape[1]
    grads = []
    for checkpointing in (False, True):
        actor = Actor.from_pretrained(tiny_paths["policy"], tokenizer).train()
        actor.padding_free = True
        if checkpointing:
            actor.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = torch.where(loss_mask, actor(sequences, attention_mask, num_actions), 0.0).sum()
        grads.append(torch.autograd.grad(loss, list(actor.parameters())))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_packed_forward_refuses_a_model_that_bypasses_the_attention_interface(tokenizer):
    from types import SimpleNamespace

    from lit_rlhf.models.padding import pack_rows, packed_forward

    class OwnAttention(torch.nn.Module):  # attends over the whole packed row: rows would mix
        config = SimpleNamespace(_attn_implementation="sdpa")

        def forward(self, input_ids, position_ids, **kwargs):
            return input_ids.float()

    sequences, attention_mask, _ = rollout_batch(tokenizer)
    with pytest.raises(RuntimeError, match="set models.padding_free: false"):
        packed_forward(OwnAttention(), pack_rows(sequences, attention_mask), attention_mask.sum(-1))
