"""``val_before_train``: one validation before the first update, logged at step 0 (the starting policy's baseline)."""

import os

import lightning as L
import pandas as pd
import pytest

from tests.helpers import SevensPPO, datamodule, small_module, trainer


@pytest.mark.parametrize("on", [True, False])
def test_ppo_val_before_train_logs_the_starting_policy_at_step_0(tiny_assets, tmp_path, on):
    L.seed_everything(0, verbose=False)
    module = small_module(tiny_assets, SevensPPO, val_before_train=on)
    t = trainer(tmp_path, 1, limit_val_batches=1, check_val_every_n_epoch=100)  # no validation of its own
    t.fit(module, datamodule=datamodule(tiny_assets))
    frame = pd.read_csv(os.path.join(t.log_dir, "metrics.csv"))
    if not on:
        assert not [c for c in frame.columns if c.startswith("val/")]
        return
    val = frame.dropna(subset=["val/reward"])
    assert val["step"].tolist() == [0] and val["epoch"].tolist() == [0]
    assert val.index[0] < frame.dropna(subset=["policy/loss"]).index[0], "written before the first update"
    # before any update the policy is its reference: the sampler's log-probs equal the reference's
    assert abs(val["val/kl"].iloc[0]) < 1e-4
    assert len(frame.dropna(subset=["policy/loss"])) == 4, "training itself is unchanged: 4 optimizer steps"


@pytest.mark.parametrize("on", [True, False])
def test_dpo_val_before_train_logs_the_starting_policy_at_step_0(tiny_assets, pairs, tmp_path, on):
    from lit_rlhf import DPOModule, PreferenceDataModule
    from tests.dpo_kit import SGD, fit

    module = DPOModule(models={"path": tiny_assets["policy"]}, optim=SGD, val_before_train=on)
    data = PreferenceDataModule(pairs["train"], val_path=pairs["val"], batch_size=16)
    frame = fit(module, data, tmp_path, max_steps=2, limit_val_batches=1, check_val_every_n_epoch=100)
    if not on:
        assert not [c for c in frame.columns if c.startswith("val/")]
        return
    val = frame.dropna(subset=["val/loss"])
    assert val["step"].tolist() == [0]
    # before any update the policy is its reference: every implicit reward is 0 and the loss is log 2
    assert abs(val["val/loss"].iloc[0] - 0.6931471805599453) < 1e-6
