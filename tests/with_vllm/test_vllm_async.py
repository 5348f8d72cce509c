"""Asynchronous rollouts with the vLLM engine: ``max_staleness: 0`` is the synchronous run bit for bit, and
with carry-over the engine resumes stopped rows by resubmitting prompt + kept tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.with_vllm.test_vllm_engine import fit, held_out_accuracy, ppo

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

CARRY = {"max_staleness": 1, "segment_tokens": 2, "over_provision": 64}


def asynchronous_ppo(demo_assets, out, engine, asynchronous):
    module = ppo(demo_assets, out, engine)
    module.rollout = dataclasses.replace(module.rollout, asynchronous=asynchronous)
    if asynchronous is not None and asynchronous.get("max_staleness", 1) > 0:
        module.algorithm = dataclasses.replace(module.algorithm, rollout_correction="decoupled")
    return module


@pytest.mark.slow
def test_max_staleness_0_with_the_engine_is_the_synchronous_run_bit_for_bit(engine, demo_assets, tmp_path):
    plain = asynchronous_ppo(demo_assets, str(tmp_path / "plain"), engine, None)
    fit(plain, demo_assets, tmp_path / "plain_logs", epochs=2)
    off = asynchronous_ppo(demo_assets, str(tmp_path / "off"), engine, {"max_staleness": 0})
    fit(off, demo_assets, tmp_path / "off_logs", epochs=2)
    for (name, a), (_, b) in zip(plain.actor.state_dict().items(), off.actor.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_carried_over_rows_resume_in_the_engine_and_the_policy_still_learns(engine, demo_assets, tmp_path):
    before = held_out_accuracy(demo_assets["sft"], demo_assets["val_prompts"])
    module = asynchronous_ppo(demo_assets, str(tmp_path / "carry"), engine, CARRY)
    log = fit(module, demo_assets, tmp_path / "carry_logs", epochs=8)
    after = held_out_accuracy(str(tmp_path / "carry" / "actor"), demo_assets["val_prompts"])
    print(f"held-out accuracy: SFT {before:.3f}, asynchronous PPO with the engine {after:.3f}")
    assert after > before + 0.02, (before, after)
    rollouts = log.dropna(subset=["rollout/staleness_max"])
    assert len(rollouts) == 8 and (rollouts["rollout/staleness_max"] <= 1).all()
    assert rollouts["rollout/carried_over_rows"].gt(0).any() and rollouts["rollout/staleness_max"].max() == 1
    exp = module.buffer.experience
    # tokens sampled by this rollout's weights: the engine's log-probs are the trainer's (the push held)
    fresh = exp.loss_mask & (exp.versions == exp.rollout_id[:, None])
    assert (exp.old_log_probs[fresh] - exp.rollout_log_probs[fresh]).abs().max() < 1e-3
    lengths = exp.loss_mask.sum(-1)
    assert int(lengths.max()) <= 4 and int(lengths.min()) >= 1


@pytest.mark.slow
def test_a_vllm_engine_in_a_process_of_its_own_samples_what_the_colocated_one_samples(engine, demo_assets):
    """SeparateEngine hosting a VLLMEngine: weights pushed over gloo to its process, which pushes them to
    its engine; the same requests sample the same tokens as the colocated engine."""
    from lit_rlhf.models import Actor, load_tokenizer
    from lit_rlhf.rollout import SeparateEngine
    from lit_rlhf.rollout.engines.packing import requests_from_prompts
    from lit_rlhf.settings import GenerationSettings

    tok = load_tokenizer(demo_assets["sft"])
    actor = Actor.from_pretrained(demo_assets["sft"], tok)
    enc = tok(["12+34=", "50-25=", "07+08=", "99-98="], return_tensors="pt", padding=True)
    requests = requests_from_prompts(enc.input_ids, enc.attention_mask, [1, 2, 3, 4])
    settings = GenerationSettings(max_new_tokens=4)
    separate = SeparateEngine(
        engine="lit_rlhf.rollout.engines.vllm.VLLMEngine", engine_args={"kv_cache_gib": 0.25, "max_num_seqs": 8}
    )
    try:
        separate.start(actor, "cpu")
        separate.sync_weights(actor)
        engine.sync_weights(actor)
        theirs, mine = separate.generate(requests, settings), engine.generate(requests, settings)
    finally:
        separate.shutdown()
    for a, b in zip(theirs, mine, strict=True):
        assert a.token_ids == b.token_ids and a.log_probs == pytest.approx(b.log_probs, abs=1e-4)
