"""Rollout engines without vLLM: the engine plumbing, the weights pushed, settings, packing, errors."""

import copy
import importlib.util
import math
import subprocess
import sys
import types

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.models.sharding import policy_weights
from lit_rlhf.rollout import NativeEngine, RolloutEngine, Sample, VLLMEngine
from lit_rlhf.rollout.engines.packing import pack_samples, requests_from_prompts
from lit_rlhf.rollout.engines.vllm import _layer_of
from lit_rlhf.rollout.engines.vllm_launch import shard_group
from lit_rlhf.rollout.engines.vllm_worker import WeightReceiver, pack_bucket, unpack_bucket
from lit_rlhf.rollout.metrics import mismatch_metrics
from lit_rlhf.settings import GenerationSettings, RolloutSettings, to_plain
from lit_rlhf.tasks import build_causal_lm, tiny_llama_config
from tests.helpers import datamodule, small_module, trainer

SHIFT = 0.1


class ShiftedEngine(RolloutEngine):
    """Samples with a private copy of the actor that receives its weights at every sync, and reports
    log-probs lowered by ``SHIFT``: an engine whose kernels disagree with the trainer's by a known amount."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.seeds: list[int] = []
        self.copy: Actor | None = None

    def start(self, actor, device) -> bool:
        self.calls.append("start")
        self.copy = NativeEngine()
        self.copy.start(copy.deepcopy(actor), device)
        return True

    def sync_weights(self, actor) -> None:
        self.calls.append("sync")
        self.copy.actor.model.load_state_dict(dict(policy_weights(actor.model)))

    def generate(self, requests, generation, on_token=None):
        self.calls.append("generate")
        self.seeds.append(requests[0].seed)
        samples = self.copy.generate(requests, generation)
        return [Sample(s.token_ids, tuple(lp - SHIFT for lp in s.log_probs), s.finish_reason) for s in samples]

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_an_engine_generates_with_pushed_weights_and_its_mismatch_is_measured(tiny_assets, tmp_path):
    engine = ShiftedEngine()
    module = small_module(tiny_assets, rollout={"engine": engine})
    assert module.rollout.recomputes_old_log_probs  # the default with an engine
    fit = trainer(tmp_path, max_epochs=3)
    fit.fit(module, datamodule=datamodule(tiny_assets))
    # after each push the probe (one row, the same seed every time), then the rollout
    assert engine.calls == ["start"] + ["sync", "generate", "generate"] * 3 + ["shutdown"]
    assert len(set(engine.seeds[0::2])) == 1 and len(set(engine.seeds[1::2])) == 3
    # the copy got the trained weights: the trainer's old log-probs are its sampler's within float error,
    # so the measured mismatch is the injected shift
    metrics = pd.read_csv(f"{fit.logger.log_dir}/metrics.csv")
    diff = metrics["rollout/logprob_abs_diff"].dropna()
    assert len(diff) == 3
    torch.testing.assert_close(
        torch.tensor(diff.to_numpy()), torch.full((3,), SHIFT, dtype=torch.float64), atol=1e-4, rtol=0
    )
    ratio = metrics["rollout/importance_ratio_max"].dropna().to_numpy()
    assert abs(ratio[-1] - torch.exp(torch.tensor(SHIFT)).item()) < 1e-3
    assert (metrics["perf/weight_sync_s"].dropna() >= 0).all()
    probe = torch.tensor(metrics["rollout/weight_check_logprob_diff"].dropna().to_numpy())
    torch.testing.assert_close(probe, torch.full((3,), SHIFT, dtype=torch.float64), atol=1e-4, rtol=0)
    last = module.buffer.experience  # the last rollout: old log-probs are the trainer's, the engine's kept beside
    mask = last.loss_mask
    gap = last.old_log_probs[mask] - last.rollout_log_probs[mask]
    torch.testing.assert_close(gap, torch.full_like(gap, SHIFT), atol=1e-4, rtol=0)


def test_the_decoupled_loss_weights_every_token_by_the_behaviour_ratio(tiny_assets, tmp_path):
    """The engine's log-probs are the trainer's lowered by SHIFT, so each token's behaviour weight
    π_prox/μ is exp(SHIFT) (below the cap)."""
    module = small_module(
        tiny_assets, rollout={"engine": ShiftedEngine()}, algorithm={"rollout_correction": "decoupled"}
    )
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(module, datamodule=datamodule(tiny_assets))
    metrics = pd.read_csv(f"{fit.logger.log_dir}/metrics.csv")
    steps = metrics.dropna(subset=["policy/behaviour_weight"])
    assert sorted(set(steps["epoch"])) == [0, 1]
    for key in ("policy/behaviour_weight", "policy/behaviour_weight_max"):  # every step: the same proximal policy
        values = torch.tensor(steps[key].to_numpy())
        torch.testing.assert_close(values, torch.full_like(values, math.exp(SHIFT)), atol=1e-3, rtol=0)
    assert (metrics["rollout/token_mult_prob_error"].dropna() - math.exp(SHIFT)).abs().max() < 1e-3


class StaleEngine(ShiftedEngine):
    """Takes the actor's weights once, at the first push, and never again (a push that did not load)."""

    def sync_weights(self, actor) -> None:
        if "sync" not in self.calls:
            super().sync_weights(actor)
        else:
            self.calls.append("sync")


def test_an_engine_whose_weights_went_stale_stops_the_run_after_the_push(tiny_assets, tmp_path):
    engine = StaleEngine()
    fast = {"actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=0.05)}}  # the weights move far in one rollout
    module = small_module(tiny_assets, rollout={"engine": engine}, optim=fast)
    with pytest.raises(RuntimeError, match=r"differ from the trainer's by [0-9.]+ on average \(> rollout.weight_check"):
        trainer(tmp_path, max_epochs=3).fit(module, datamodule=datamodule(tiny_assets))
    # the first push loaded (the probe passed, the rollout trained); the second did not and was caught before
    # its rollout was generated
    assert engine.calls == ["start", "sync", "generate", "generate", "sync", "generate", "shutdown"]
    with pytest.raises(ValueError, match="weight_check_tolerance"):
        small_module(tiny_assets, rollout={"engine": ShiftedEngine(), "weight_check_tolerance": 0})


def test_the_same_seed_gives_the_same_rollout_through_an_engine(tiny_assets, tmp_path):
    runs = []
    for name in ("a", "b"):
        engine = ShiftedEngine()
        module = small_module(tiny_assets, rollout={"engine": engine})
        torch.manual_seed(0)
        trainer(tmp_path / name, max_epochs=2).fit(module, datamodule=datamodule(tiny_assets))
        runs.append((engine.seeds, {k: v.clone() for k, v in module.actor.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, msg=key)


def test_policy_weights_merge_lora_like_peft_and_keep_hugging_face_names(tiny_paths):
    tok = load_tokenizer(tiny_paths["policy"])
    model = build_causal_lm(tiny_llama_config(tok, hidden_size=32, num_layers=2, num_heads=2))
    names = set(model.state_dict())
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    pushed = dict(policy_weights(lora))
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert set(pushed) == names == set(merged)
    for key, value in merged.items():
        torch.testing.assert_close(pushed[key], value, atol=1e-6, rtol=0, msg=key)
    assert (
        pushed["model.layers.0.self_attn.q_proj.weight"] - model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    ).abs().max() > 1e-2
    for key, value in lora.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[key]), key


def test_weight_chunks_never_split_a_decoder_layer():
    assert _layer_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert _layer_of("transformer.h.11.attn.c_attn.weight") == "transformer.h.11"
    assert _layer_of("model.embed_tokens.weight") == "" and _layer_of("lm_head.weight") == ""


class RecordingLLM:
    """Stands in for ``vllm.LLM``: runs the worker extension's methods on a state dict, in this process."""

    def __init__(self) -> None:
        self.receiver, self.loaded, self.calls = WeightReceiver(), {}, []
        self.receiver.reload_weights = lambda weights_iterator: self.loaded.update(
            {name: tensor.clone() for name, tensor in weights_iterator}
        )
        self.receiver.model_runner = types.SimpleNamespace(get_model=lambda: torch.nn.Linear(2, 2))

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [getattr(self.receiver, method)(*args)]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


def test_a_bucket_of_weights_is_one_flat_buffer_whose_views_are_the_weights():
    named = [("a.weight", torch.randn(3, 4)), ("a.bias", torch.randn(3)), ("b.weight", torch.randn(2, 2, 2))]
    buffer, layout = pack_bucket(named)
    assert buffer.shape == (12 + 3 + 8,) and [start for _, _, start, _ in layout] == [0, 12, 15]
    views = unpack_bucket(buffer, layout)
    for (name, tensor), (view_name, view) in zip(named, views, strict=True):
        assert name == view_name and torch.equal(view, tensor)
        assert view.data_ptr() >= buffer.data_ptr()  # a view of the buffer, not a copy
    buffer.zero_()
    assert all(not view.any() for _, view in views)


def test_the_push_transport_follows_the_engine_device_and_buckets_hold_whole_layers(tiny_paths):
    engine = VLLMEngine(push_chunk_mib=16 / 2**20)  # 16 bytes: every layer is a bucket of its own
    assert engine.transport == "safetensors"  # not started
    engine._device = torch.device("cuda")
    assert engine.transport == "cuda_ipc"
    engine._group = object()
    assert engine.transport == "in_process"
    engine._device, engine._group = torch.device("cpu"), None
    model = build_causal_lm(tiny_llama_config(load_tokenizer(tiny_paths["policy"]), hidden_size=32, num_layers=2))
    engine.llm, engine.dtype = RecordingLLM(), torch.bfloat16
    engine.sync_weights(types.SimpleNamespace(model=model))
    assert engine.llm.calls[-2:] == ["weights_loaded", "reset_prefix_cache"]
    assert set(engine.llm.calls[:-2]) == {"load_weight_chunk"}
    state = model.state_dict()
    assert set(engine.llm.loaded) == set(state)
    for name, tensor in engine.llm.loaded.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].to(torch.bfloat16)), name
    # embeddings, two layers, then the final norm and head: one bucket per layer, never a layer split
    assert len(engine.llm.calls) - 2 == 1 + 2 + 1
    assert engine.last_push["tensors"] == len(state)


class PackedHead(torch.nn.Module):
    """An output layer whose GEMM weight is processed once after loading (vLLM on CPU packs it)."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.quant_method = types.SimpleNamespace(process_weights_after_loading=self.pack)
        self.pack(self)

    @staticmethod
    def pack(layer) -> None:
        layer.packed = layer.weight.detach().clone()


@pytest.mark.parametrize("tied", [True, False])
def test_after_a_push_a_tied_output_layer_is_packed_again_from_the_new_embedding(tied):
    embed = torch.nn.Embedding(5, 3)
    head = PackedHead(embed.weight if tied else torch.nn.Parameter(torch.randn(5, 3)))
    model = torch.nn.ModuleDict({"embed_tokens": embed, "lm_head": head})  # vLLM's model: no get_input_embeddings
    with torch.no_grad():
        embed.weight.add_(1.0)  # the push loads the embedding (and, tied, the head with it)
    receiver = WeightReceiver()
    receiver.model_runner = types.SimpleNamespace(get_model=lambda: model)
    assert receiver.weights_loaded() is tied
    if tied:
        assert torch.equal(head.packed, embed.weight)
    else:
        assert not torch.equal(head.packed, embed.weight)


def test_samples_are_packed_behind_their_prompts_with_the_mask_of_what_was_sampled():
    input_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 3]])
    attention_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    requests = requests_from_prompts(input_ids, attention_mask, [11, 12, 13], stop_token_ids=(4,))
    assert [(r.prompt_ids, r.seed, r.stop_token_ids) for r in requests] == [
        ((5, 6), 11, (4,)),
        ((7, 8, 9), 12, (4,)),
        ((3,), 13, (4,)),
    ]
    samples = [
        Sample((4, 2), (-0.5, -0.25), "stop"),  # stopped at EOS (its last token)
        Sample((4, 4, 4, 4), (-1.0, -2.0, -3.0, -4.0), "length"),  # cut at max_new_tokens
        Sample((2, 2), (-1.5, -0.5), "stop"),  # the pad id equals a sampled token: the mask still knows
    ]
    out = pack_samples(input_ids, attention_mask, samples, pad_token_id=2)
    assert out.sequences.tolist() == [[0, 5, 6, 4, 2, 2, 2], [7, 8, 9, 4, 4, 4, 4], [0, 0, 3, 2, 2, 2, 2]]
    assert out.loss_mask.tolist() == [[True, True, False, False], [True] * 4, [True, True, False, False]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7, [0, 0, 1, 1, 1, 0, 0]]
    assert out.log_probs.tolist() == [[-0.5, -0.25, 0.0, 0.0], [-1.0, -2.0, -3.0, -4.0], [-1.5, -0.5, 0.0, 0.0]]
    assert out.finished.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="2 samples for 3 prompts"):
        pack_samples(input_ids, attention_mask, samples[:2], pad_token_id=2)
    with pytest.raises(ValueError, match="2 token ids but 1 log-probs"):
        Sample((1, 2), (-0.1,), "stop")
    with pytest.raises(ValueError, match="finish_reason"):
        Sample((1,), (-0.1,), "eos")


def test_the_native_engine_samples_what_the_actor_samples(tiny_assets):
    tok = load_tokenizer(tiny_assets["policy"])
    actor = Actor.from_pretrained(tiny_assets["policy"], tok)
    enc = tok(["12+34=", "5+5=", "77+1="], return_tensors="pt", padding=True)
    settings = GenerationSettings(max_new_tokens=6, temperature=1.5)
    direct = actor.generate(enc.input_ids, enc.attention_mask, settings, torch.Generator().manual_seed(7))
    engine = NativeEngine()
    assert engine.start(actor, "cpu") and not engine.start(actor, "cpu")  # a second start: already running
    samples = engine.generate(requests_from_prompts(enc.input_ids, enc.attention_mask, [7, 8, 9]), settings)
    packed = pack_samples(enc.input_ids, enc.attention_mask, samples, actor.pad_token_id)
    assert torch.equal(packed.sequences, direct.sequences) and torch.equal(packed.loss_mask, direct.loss_mask)
    assert torch.equal(packed.log_probs, direct.log_probs) and torch.equal(packed.finished, direct.finished)
    assert not engine.recomputes_old_log_probs and engine.samples_with_actor
    assert RolloutSettings(engine="native").engine == NativeEngine()


def test_mismatch_metrics_by_hand():
    experience = types.SimpleNamespace(
        loss_mask=torch.tensor([[True, True, False], [True, False, False]]),
        old_log_probs=torch.tensor([[-1.0, -2.0, 5.0], [-0.5, 0.0, 0.0]]),
        rollout_log_probs=torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 9.0, 0.0]]),
    )
    metrics = mismatch_metrics(experience)
    # valid diffs old - rollout: 0.5, -1.0, 0.0
    assert metrics["rollout/logprob_abs_diff"].item() == pytest.approx(1.5 / 3)
    assert metrics["rollout/logprob_abs_diff_max"].item() == pytest.approx(1.0)
    ratios = torch.exp(torch.tensor([0.5, -1.0, 0.0]))
    assert metrics["rollout/importance_ratio"].item() == pytest.approx(ratios.mean().item())
    assert metrics["rollout/importance_ratio_max"].item() == pytest.approx(ratios.max().item())
    assert metrics["rollout/token_mult_prob_error"].item() == pytest.approx(torch.tensor([0.5, 1.0, 0.0]).exp().mean())


def test_engine_settings_round_trip_and_are_checked():
    rollout = RolloutSettings(engine={"class_path": "lit_rlhf.rollout.VLLMEngine", "init_args": {"kv_cache_gib": 0.5}})
    assert isinstance(rollout.engine, VLLMEngine) and rollout.engine.kv_cache_gib == 0.5
    assert rollout.recomputes_old_log_probs and not RolloutSettings().recomputes_old_log_probs
    assert not RolloutSettings(engine=VLLMEngine(), recompute_old_log_probs=False).recomputes_old_log_probs
    plain = to_plain(rollout)
    assert plain["engine"]["class_path"] == "lit_rlhf.rollout.engines.vllm.VLLMEngine"
    assert RolloutSettings(**plain).engine == rollout.engine
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        VLLMEngine(tensor_parallel_size=0)
    assert VLLMEngine(tensor_parallel_size=2).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="kv_cache_gib"):
        VLLMEngine(kv_cache_gib=0)
    with pytest.raises(ValueError, match="rollout.engine must be"):
        RolloutSettings(engine="vllm")
    with pytest.raises(ValueError, match="sleep mode"):
        VLLMEngine(enable_sleep_mode=True).check_device(torch.device("cpu"))


def test_what_an_engine_cannot_do_is_refused_before_models_load(tiny_assets):
    with pytest.raises(ValueError, match="4-bit"):
        small_module(
            tiny_assets,
            models={"actor_path": tiny_assets["policy"], "load_in_4bit": True, "lora": {"rank": 4}},
            rollout={"engine": VLLMEngine()},
        )
    for correction in ("tis", "decoupled"):
        with pytest.raises(ValueError, match="recompute_old_log_probs"):
            small_module(tiny_assets, algorithm={"rollout_correction": correction})
    with pytest.raises(ValueError, match="needs algorithm.rollout_correction: decoupled"):
        small_module(tiny_assets, algorithm={"rollout_correction": "tis", "rollout_correction_level": "sequence"})
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        small_module(tiny_assets, algorithm={"rollout_correction": "tis", "rollout_correction_cap": 0.5})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_names_the_extra(tiny_assets):
    tok = load_tokenizer(tiny_assets["policy"])
    module = types.SimpleNamespace(actor=Actor.from_pretrained(tiny_assets["policy"], tok), device=torch.device("cpu"))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]"'):
        VLLMEngine().start(module.actor, module.device)


def test_vllm_is_never_imported_unless_an_engine_starts():
    code = (
        "import sys, lit_rlhf, lit_rlhf.rollout, lit_rlhf.cli; "
        "from lit_rlhf.settings import RolloutSettings; "
        "RolloutSettings(engine={'class_path': 'lit_rlhf.rollout.VLLMEngine'}); "
        "assert 'vllm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_sampling_settings_need_the_vocabulary():
    engine = VLLMEngine()
    engine.vocab_size = 10
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("builds vLLM's SamplingParams")
    with pytest.raises(ValueError, match="suppress_token_ids"):
        engine.sampling_params(GenerationSettings(suppress_token_ids=[12]), seed=0)


def test_a_sharded_engine_needs_a_world_size_it_divides():
    """tensor_parallel_size=t puts one engine on every t ranks: a single-process trainer cannot host
    t=2, and the error says which setting to change (checked before vLLM is imported)."""
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 splits each engine over 2 ranks.*trainer.devices"):
        shard_group(VLLMEngine(tensor_parallel_size=2).tensor_parallel_size, torch.device("cpu"))


def test_a_row_ended_by_a_stop_string_is_finished_not_penalised_as_truncated(tiny_assets):
    from lit_rlhf import PPOModule

    class Zero(PPOModule):
        def compute_reward(self, prompts, responses):
            return torch.zeros(len(responses))

    module = small_module(tiny_assets, cls=Zero, algorithm={"missing_eos_penalty": 1.0})
    module.configure_model()
    eos = module.tokenizer.eos_token_id
    input_ids, attention_mask = torch.tensor([[5, 6]] * 3), torch.ones(3, 2, dtype=torch.long)
    samples = [  # a stop string, cut at max tokens, EOS
        Sample((4, 5), (-1.0, -1.0), "stop"),
        Sample((4, 4, 4), (-1.0,) * 3, "length"),
        Sample((4, eos), (-1.0, -1.0), "stop"),
    ]
    out = pack_samples(input_ids, attention_mask, samples, module.tokenizer.pad_token_id)
    assert out.finished.tolist() == [True, False, True]
    assert module.score_responses(out, ["p"] * 3, {}).scores.tolist() == [0.0, -1.0, 0.0]


def test_the_scheduler_never_splits_a_seeded_prompt_on_cpu():
    from lit_rlhf.rollout.engines.vllm_launch import scheduler_args

    # CPU: chunked prefill off (vLLM's CPU sampler cannot rewind a seeded request's generator)
    assert scheduler_args(64, None, None, 256, cuda=False) == {"max_num_seqs": 64, "enable_chunked_prefill": False}
    assert scheduler_args(64, 512, None, 256, cuda=True) == {"max_num_seqs": 64, "max_num_batched_tokens": 512}
    with pytest.raises(ValueError, match="max_num_batched_tokens=128 is less than max_model_len 256"):
        scheduler_args(64, 128, None, 256, cuda=False)
    engine = VLLMEngine(enable_chunked_prefill=True, max_num_batched_tokens=4096)
    assert engine.init_args()["enable_chunked_prefill"] and engine.init_args()["max_num_batched_tokens"] == 4096
    with pytest.raises(ValueError, match="enable_chunked_prefill=true on CPU"):
        engine.check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="max_num_batched_tokens=0"):
        VLLMEngine(max_num_batched_tokens=0)


def test_an_engine_death_names_the_cause_and_the_settings_to_change():
    from lit_rlhf.rollout.engines.vllm_launch import engine_death

    class EngineDeadError(Exception):  # vLLM's, by name (vLLM is not installed here)
        pass

    scheduler = types.SimpleNamespace(max_num_seqs=256, max_num_batched_tokens=4096, enable_chunked_prefill=True)
    llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(vllm_config=types.SimpleNamespace(scheduler_config=scheduler))
    )
    error = engine_death(EngineDeadError("EngineCore encountered an issue"), llm, rows=128, prompt_tokens=7808)
    message = str(error)
    assert "128 rows (7808 prompt tokens)" in message and "max_num_batched_tokens=4096" in message
    assert "CPU Generator does not use offset" in message
    assert "rollout.engine.init_args.enable_chunked_prefill: false" in message
    assert engine_death(ValueError("a bad prompt"), llm, 1, 1) is None  # other errors pass through unchanged
