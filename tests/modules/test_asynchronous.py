"""Asynchronous rollouts in a fit (``rollout.asynchronous``): off is the synchronous run bit for bit; on,
stale tokens are trained with the decoupled loss within the staleness bound, the metrics account for
them, and a resumed run neither repeats nor skips a prompt."""

import pandas as pd
import pytest
import torch

from lit_rlhf.modules.ppo_checkpoint import IN_FLIGHT_KEY
from tests.helpers import datamodule, fit, trainer

ASYNC = {
    "generation": {"max_new_tokens": 12, "n_samples_per_prompt": 2},
    "rollout": {
        "rollout_batch_size": 8,
        "score_micro_batch_size": 8,
        "asynchronous": {"max_staleness": 1, "over_provision": 4, "segment_tokens": 3},
    },
    "algorithm": {"rollout_correction": "decoupled", "mini_batch_size": 8, "micro_batch_size": 8, "ppo_epochs": 1},
}


def metrics(t):
    return pd.read_csv(f"{t.logger.log_dir}/metrics.csv")


def test_max_staleness_0_is_the_synchronous_run_bit_for_bit(make, tmp_path):
    plain = make()
    fit(tmp_path / "plain", plain, 2)
    off = make(rollout={"asynchronous": {"max_staleness": 0}})
    fit(tmp_path / "off", off, 2)
    for (name, a), (_, b) in zip(plain.actor.state_dict().items(), off.actor.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(plain.buffer.experience.sequences, off.buffer.experience.sequences)
    assert off.runner.carry_over is None


def test_asynchronous_rollouts_train_stale_tokens_within_the_bound_and_log_them(make, tmp_path):
    module = make(**ASYNC)
    t = fit(tmp_path, module, 4)
    exp = module.buffer.experience
    assert len(exp) == 16
    staleness = (exp.rollout_id[:, None] - exp.versions)[exp.loss_mask]
    assert int(staleness.min()) >= 0 and int(staleness.max()) <= 1
    logged = metrics(t).dropna(subset=["rollout/staleness_max"]).set_index("epoch")
    assert len(logged) == 4
    assert (logged["rollout/staleness_max"] <= 1).all() and (logged["rollout/staleness_mean"] >= 0).all()
    assert logged.loc[0, "rollout/staleness_max"] == 0, "the first rollout has nothing older"
    assert logged["rollout/carried_over_rows"].sum() > 0, "rows were stopped and carried over"
    assert (logged["rollout/carried_over_rows"] <= (2 * 8 - 8) * 2).all(), "within the capacity bound"
    assert (logged["perf/trainer_idle_s"] > 0).all() and logged.loc[1, "perf/generator_idle_s"] > 0
    assert logged["rollout/staleness_max"].max() == 1, "some carried-over tokens were trained a version late"
    # the decoupled loss's proximal policy is the trainer's own forward, not the stale sampler's
    stale = exp.loss_mask & (exp.versions < exp.rollout_id[:, None])
    if bool(stale.any()):
        assert not torch.allclose(exp.old_log_probs[stale], exp.rollout_log_probs[stale])
    assert "policy/behaviour_weight" in metrics(t).columns


def test_a_resumed_asynchronous_run_neither_repeats_nor_skips_a_prompt(make, tmp_path):
    full = make(**ASYNC)
    fit(tmp_path / "full", full, 3)
    first = make(**ASYNC)
    t = fit(tmp_path / "first", first, 2)
    ckpt = tmp_path / "after2.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert len(saved[IN_FLIGHT_KEY]) == 1 and saved[IN_FLIGHT_KEY][0]["rollout"] == 1
    resumed = make(**ASYNC)
    again = trainer(tmp_path / "resumed", 3)
    again.fit(resumed, datamodule=datamodule(resumed.assets), ckpt_path=str(ckpt))
    # the third rollout trains the same rows, and the same rows are left in flight
    assert torch.equal(full.buffer.experience.sequences, resumed.buffer.experience.sequences)
    assert full.runner.in_flight_state() == resumed.runner.in_flight_state()
    state = resumed.runner.carry_over.state
    positions = [g.position for g in state.groups]
    assert len(set(positions)) == len(positions) and max(positions) < state.next_position


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"algorithm": {"rollout_correction": "none"}}, "rollout_correction: decoupled"),
        ({"rollout": {"recompute_old_log_probs": False}}, "recompute_old_log_probs"),
        ({"rollout": {"multi_turn": {"max_turns": 2}}}, "multi_turn is not supported"),
        ({"rollout": {"asynchronous": {"max_staleness": -1}}}, "max_staleness must be >= 0"),
        ({"rollout": {"asynchronous": {"on_stale": "skip"}}}, "unknown rollout.asynchronous.on_stale"),
    ],
)
def test_asynchronous_settings_that_would_train_wrongly_are_refused(make, groups, message):
    settings = {name: dict(fields) for name, fields in ASYNC.items()}
    for name, fields in groups.items():
        if name == "rollout" and "asynchronous" in fields:
            fields = {**fields, "asynchronous": {**ASYNC["rollout"]["asynchronous"], **fields["asynchronous"]}}
        settings[name] = {**settings[name], **fields}
    with pytest.raises(ValueError, match=message):
        make(**settings)
