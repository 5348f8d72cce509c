"""SeparateEngine: an engine in a process of its own, weights pushed over a gloo group in buckets."""

import dataclasses
import time

import lightning as L
import pandas as pd
import pytest
import torch

from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.rollout import NativeEngine, SeparateEngine
from lit_rlhf.rollout.carry_over import SEED_STRIDE
from lit_rlhf.rollout.engines.packing import requests_from_prompts
from lit_rlhf.settings import GenerationSettings
from tests.helpers import SevensPPO, datamodule, fit, small_module, trainer


@pytest.fixture
def actor(tiny_assets):
    tok = load_tokenizer(tiny_assets["policy"])
    return Actor.from_pretrained(tiny_assets["policy"], tok)


def requests(actor):
    enc = actor.tokenizer(["12+34=", "5+5=", "77+1=", "9+9="], return_tensors="pt", padding=True)
    return requests_from_prompts(enc.input_ids, enc.attention_mask, [3, 4, 5, 6])


def test_the_separate_process_samples_what_the_pushed_weights_sample_here(actor):
    settings = GenerationSettings(max_new_tokens=8)
    here = NativeEngine()
    here.start(actor, "cpu")
    engine = SeparateEngine(bucket_mib=0)  # one tensor per bucket: many buckets
    try:
        assert engine.start(actor, "cpu")
        engine.sync_weights(actor)
        assert engine.pushes == 1 and engine.last_push["buckets"] == len(list(actor.model.parameters()))
        first, expected = engine.generate(requests(actor), settings), here.generate(requests(actor), settings)
        for a, b in zip(first, expected, strict=True):
            assert a.token_ids == b.token_ids and a.log_probs == pytest.approx(b.log_probs, abs=1e-5)
        with torch.no_grad():  # the trainer's weights move; the engine keeps the old ones until a push
            for p in actor.model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        engine.submit(requests(actor), settings)
        stale, versions, _ = engine.collect()
        assert {v for row in versions for v in row} == {1} and [len(v) for v in versions] == [
            len(s.token_ids) for s in stale
        ]
        assert [s.token_ids for s in stale] == [s.token_ids for s in first]
        engine.sync_weights(actor)
        fresh, version = engine.generate(requests(actor), settings), engine.pushes
        assert version == 2
        moved = here.generate(requests(actor), settings)
        assert [s.token_ids for s in fresh] == [s.token_ids for s in moved] != [s.token_ids for s in first]
    finally:
        engine.shutdown()
    assert engine.process is None


def test_without_pausing_generations_queued_before_a_push_sample_with_the_weights_they_were_submitted_under(actor):
    settings = GenerationSettings(max_new_tokens=6)
    here = NativeEngine()
    here.start(actor, "cpu")
    engine = SeparateEngine(pause_for_push=False)
    try:
        engine.start(actor, "cpu")
        engine.sync_weights(actor)
        before = here.generate(requests(actor), settings)
        engine.submit(requests(actor), settings)  # still queued or running when the next push comes
        with torch.no_grad():
            for p in actor.model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        engine.sync_weights(actor)
        engine.submit(requests(actor), settings)
        after = here.generate(requests(actor), settings)
        (first, v1, _), (second, v2, _) = engine.collect(), engine.collect()
        assert {v for row in v1 for v in row} == {1} and {v for row in v2 for v in row} == {2}
        assert engine.in_flight == 0
        assert [s.token_ids for s in first] == [s.token_ids for s in before]
        assert [s.token_ids for s in second] == [s.token_ids for s in after] != [s.token_ids for s in before]
        with pytest.raises(RuntimeError, match="without a submitted generation"):
            engine.collect()
    finally:
        engine.shutdown()


def test_a_push_pauses_the_generation_in_flight_and_its_rows_go_on_with_the_new_weights(actor):
    """The push lands between two decoding steps: every row's first m tokens are the old weights' (as
    an engine here samples them), the rest the new weights' continuation of them (prompt + kept tokens,
    the continuation's seed), each token with the version that sampled it; the push did not wait for
    the generation to end."""
    settings = GenerationSettings(max_new_tokens=16)
    here = NativeEngine()
    here.start(actor, "cpu")
    engine = SeparateEngine(engine="tests.faults.SlowEngine", engine_args={"step_s": 0.1})
    try:
        engine.start(actor, "cpu")
        engine.sync_weights(actor)
        old = here.generate(requests(actor), settings)
        engine.submit(requests(actor), settings)
        with torch.no_grad():
            for p in actor.model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        start = time.perf_counter()
        engine.sync_weights(actor)
        pushed_s = time.perf_counter() - start
        samples, versions, generation_s = engine.collect()
    finally:
        engine.shutdown()
    assert pushed_s < generation_s, "the push was loaded while the generation was in flight"
    (m,) = {row.count(1) for row in versions}  # every row paused at the same step
    assert 1 <= m < 16
    for row, sample in zip(versions, samples, strict=True):
        assert list(row) == [1] * m + [2] * (len(sample.token_ids) - m)
    continued = [
        dataclasses.replace(
            r, prompt_ids=r.prompt_ids + s.token_ids[:m], seed=r.seed + SEED_STRIDE * m, max_new_tokens=16 - m
        )
        for r, s in zip(requests(actor), old, strict=True)
    ]
    new = here.generate(continued, settings)
    for sample, before, after in zip(samples, old, new, strict=True):
        assert sample.token_ids == before.token_ids[:m] + after.token_ids
        assert sample.log_probs == pytest.approx(before.log_probs[:m] + after.log_probs, abs=1e-5)
        assert sample.finish_reason == after.finish_reason


def test_a_generation_waits_for_its_own_samples_behind_generations_in_flight(actor):
    """``generate`` (the weight check's probe) while rollouts are in flight returns its own samples and
    leaves theirs to collect, in order."""
    settings = GenerationSettings(max_new_tokens=6)
    here = NativeEngine()
    here.start(actor, "cpu")
    engine = SeparateEngine()
    try:
        engine.start(actor, "cpu")
        engine.sync_weights(actor)
        all_rows, one_row = requests(actor), requests(actor)[:1]
        engine.submit(all_rows, settings)
        engine.submit(one_row, settings)
        probe = engine.generate(all_rows[2:], settings)
        first, second = engine.collect()[0], engine.collect()[0]
    finally:
        engine.shutdown()
    assert (len(first), len(second), len(probe)) == (4, 1, 2)
    expected = [here.generate(rows, settings) for rows in (all_rows, one_row, all_rows[2:])]
    for got, want in zip((first, second, probe), expected, strict=True):
        assert [s.token_ids for s in got] == [s.token_ids for s in want]


@pytest.fixture
def make(tiny_assets):
    def build(**overrides):
        module = small_module(tiny_assets, SevensPPO, **overrides)
        module.assets = tiny_assets
        return module

    return build


AHEAD = {
    "generation": {"max_new_tokens": 6, "n_samples_per_prompt": 2},
    "rollout": {"rollout_batch_size": 8, "score_micro_batch_size": 16},
    "algorithm": {"advantage_estimator": "grpo", "mini_batch_size": 16, "micro_batch_size": 16},
    "kl": {"coef": 0.0},
}


def ahead_module(make, asynchronous=True, staleness=1, rollout=None, **engine):
    groups = {name: dict(fields) for name, fields in AHEAD.items()}
    groups["rollout"].update(rollout or {})
    groups["rollout"]["engine"] = SeparateEngine(**engine)
    if asynchronous:
        groups["rollout"]["asynchronous"] = {"max_staleness": staleness, "carry_over": False}
        groups["algorithm"]["rollout_correction"] = "decoupled"
    return make(**groups)


class Rollouts(L.Callback):
    """Each rollout's experience, as the buffer holds it before training."""

    def __init__(self):
        self.experiences = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.experiences.append(module.buffer.experience)


def test_one_step_off_policy_generation_trains_each_rollout_on_the_previous_weights(make, tmp_path):
    seen = Rollouts()
    module = ahead_module(make)
    t = fit(tmp_path, module, 3, callbacks=[seen])
    logged = pd.read_csv(f"{t.logger.log_dir}/metrics.csv").dropna(subset=["rollout/staleness_max"])
    assert logged["rollout/staleness_max"].tolist() == [0.0, 1.0, 1.0]
    data = datamodule(module.assets)
    data.trainer = t
    data.setup("fit")
    for k, exp in enumerate(seen.experiences):
        assert (exp.versions[exp.loss_mask] == max(k - 1, 0)).all(), "rollout k was sampled by version k - 1"
        prompts = data.rollout_prompts(k, 8)["input_ids"].repeat_interleave(2, dim=0)
        assert torch.equal(exp.sequences[:, : prompts.shape[1]], prompts), "rollout k's own prompts, each once"
        assert int(exp.loss_mask.sum(-1).min()) >= 1
    assert module.rollout.engine.process is None, "the engine's process is stopped at the end of fit"
    # the first rollout is the synchronous run's (the same weights sampled it)
    sync_seen = Rollouts()
    fit(tmp_path / "sync", ahead_module(make, asynchronous=False), 1, callbacks=[sync_seen])
    assert torch.equal(sync_seen.experiences[0].sequences, seen.experiences[0].sequences)


def test_a_resumed_run_takes_the_samples_generated_ahead_from_its_checkpoint(make, tmp_path):
    full = ahead_module(make)
    fit(tmp_path / "full", full, 3)
    first = ahead_module(make)
    t = fit(tmp_path / "first", first, 2)
    ckpt = tmp_path / "after2.ckpt"
    t.save_checkpoint(ckpt)
    (saved,) = torch.load(ckpt, weights_only=False)["rollout_in_flight"][0]["ahead"]
    assert saved["rollout"] == 2 and saved["version"] == 1 and len(saved["samples"]) == 16
    resumed = ahead_module(make)
    trainer(tmp_path / "resumed", 3).fit(resumed, datamodule=datamodule(resumed.assets), ckpt_path=str(ckpt))
    assert torch.equal(full.buffer.experience.sequences, resumed.buffer.experience.sequences)
    for (name, a), (_, b) in zip(full.actor.state_dict().items(), resumed.actor.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_max_staleness_2_keeps_two_rollouts_submitted_ahead(make, tmp_path):
    seen = Rollouts()
    module = ahead_module(make, staleness=2, pause_for_push=False)
    t = fit(tmp_path, module, 4, callbacks=[seen])
    logged = pd.read_csv(f"{t.logger.log_dir}/metrics.csv").dropna(subset=["rollout/staleness_max"])
    # rollouts 1 and 2 were submitted with rollout 0's weights, rollout 3 with rollout 1's
    assert logged["rollout/staleness_max"].tolist() == [0.0, 1.0, 2.0, 2.0]
    versions = [int(exp.versions[exp.loss_mask].unique().item()) for exp in seen.experiences]
    assert versions == [0, 0, 0, 1]


@pytest.mark.slow
def test_with_pausing_a_rollout_in_flight_takes_the_pushes_it_meets_within_the_bound(make, tmp_path):
    """max_staleness 2, rollouts generated slowly: rollout k + 1 is in flight when rollout k's weights are
    pushed, so its rows go on with them; no token is older than 2 versions, and a row's versions never
    go back."""
    seen = Rollouts()
    slow = {"engine": "tests.faults.SlowEngine", "engine_args": {"step_s": 1.0}}  # generating outlasts training
    module = ahead_module(make, staleness=2, rollout={"weight_check_tolerance": None}, **slow)
    fit(tmp_path, module, 3, callbacks=[seen], enable_checkpointing=False)  # a checkpoint collects what is in flight
    mixed = 0
    for k, exp in enumerate(seen.experiences):
        versions = exp.versions.masked_fill(~exp.loss_mask, 10**6)
        assert bool((versions.diff(dim=1)[:, : exp.loss_mask.shape[1] - 1] >= 0).all()), "versions only grow"
        taken = exp.versions[exp.loss_mask]
        assert int(taken.min()) >= k - 2 and int(taken.max()) <= max(k - 1, 0)
        mixed += int(taken.unique().numel() > 1)
    assert mixed >= 1, "a push met a rollout in flight"


def test_carry_over_with_an_engine_that_generates_ahead_is_refused(make):
    groups = {name: dict(fields) for name, fields in AHEAD.items()}
    groups["rollout"].update(engine=SeparateEngine(), asynchronous={"max_staleness": 1})
    groups["algorithm"]["rollout_correction"] = "decoupled"
    with pytest.raises(ValueError, match="carry_over: false"):
        make(**groups)
