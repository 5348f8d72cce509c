"""SIGTERM and Ctrl-C during fit: a non-zero exit, a checkpoint where the state is whole, the resume command,
and a resumed run that trains exactly what an uninterrupted one does."""

import os
import re
from pathlib import Path

import pytest
import yaml

from lit_rlhf.checkpoints import load_checkpoint_file
from lit_rlhf.cli import resume_command
from lit_rlhf.signals import EXPERIENCE_KEY
from tests.test_checkpoint_faults import cli_run, steps
from tests.test_cli import ROOT, run, tiny_overrides

EPOCHS = 4


def test_the_resume_command_repeats_the_run_with_ckpt_path_last():
    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "x.ckpt", "--trainer.max_epochs=3", "--ckpt_path=y"]
    assert resume_command(argv) == "lit-rlhf fit --config 'a b.yaml' --trainer.max_epochs=3 --ckpt_path last"
    assert resume_command(["validate", "--config", "c.yaml"]) is None


@pytest.fixture(scope="module")
def full_run(tiny_assets, tmp_path_factory):
    """An uninterrupted run of configs/ppo_tiny.yaml (4 rollouts), to compare resumed runs with."""
    tmp_path = tmp_path_factory.mktemp("full")
    cli_run(tiny_assets, tmp_path / "runs", tmp_path, EPOCHS)
    return steps(tmp_path / "runs" / "version_0")


def assert_same_updates(full, run_dir, epochs):
    resumed = steps(run_dir)
    for epoch in epochs:
        a, b = full[full.epoch == epoch], resumed[resumed.epoch == epoch]
        assert len(a) == 4  # 64 experiences / mini-batches of 32 x 2 PPO epochs
        for key in ("policy/loss", "critic/loss", "policy/grad_norm"):
            assert a[key].tolist() == b[key].tolist(), (epoch, key)  # bit-identical, not approximately


@pytest.mark.slow
def test_sigterm_between_optimizer_steps_exits_143_saves_and_resumes_exactly(tiny_assets, full_run, tmp_path):
    root = tmp_path / "runs"
    fault = {"class_path": "tests.signal_faults.SignalAt", "init_args": {"epoch": 2, "batch": 1}}
    stopped = cli_run(tiny_assets, root, tmp_path, EPOCHS, [fault], check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    # mini-batch 1 of rollout 2 finishes its optimizer step: 2 rollouts x 4 steps + 2
    saved = root / "version_0" / "checkpoints" / "interrupted-epoch=2-step=20.ckpt"
    checkpoint = load_checkpoint_file(str(saved))
    assert checkpoint["global_step"] == 20 and checkpoint[EXPERIENCE_KEY]["batches_done"] == 2
    assert f"saved checkpoint {saved}" in stopped.stderr
    assert re.search(r"Resume with: lit-rlhf fit --config \S+ppo_tiny.yaml .* --ckpt_path last\n", stopped.stderr)
    resumed = cli_run(tiny_assets, root, tmp_path, EPOCHS, extra=["--ckpt_path", "last"])
    assert f"resuming from {saved}" in resumed.stdout
    assert_same_updates(full_run, root / "version_0", (2, 3))


@pytest.mark.slow
def test_ctrl_c_during_a_rollout_exits_130_and_the_rollout_is_sampled_again(tiny_assets, full_run, tmp_path):
    root = tmp_path / "runs"
    overrides = tiny_overrides(tiny_assets, root)
    config = yaml.safe_load(Path(ROOT, "configs", "ppo_tiny.yaml").read_text())
    every_two = config["trainer"]["callbacks"][0]
    every_two["init_args"]["every_n_epochs"] = 2  # no checkpoint after rollout 0: the stop has to save one
    fault = {
        "class_path": "tests.signal_faults.SignalAt",
        "init_args": {"epoch": 1, "signal_name": "SIGINT", "marker": str(tmp_path / "sent")},
    }
    (root / "faults.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [every_two, fault]}}))
    args = ["fit", "--config", os.path.join(ROOT, "configs", "ppo_tiny.yaml"), *overrides]
    args += ["--config", str(root / "faults.yaml"), "--trainer.max_epochs", str(EPOCHS)]
    args += ["--trainer.check_val_every_n_epoch", "100"]
    stopped = run(args, tmp_path, check=False)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    saved = root / "version_0" / "checkpoints" / "interrupted-epoch=1-step=8.ckpt"
    checkpoint = load_checkpoint_file(str(saved))
    assert EXPERIENCE_KEY not in checkpoint, "stopped before the rollout filled the buffer: nothing of it is kept"
    assert "SIGINT: stopped at rollout/epoch 1, optimizer step 8; saved checkpoint" in stopped.stderr
    run([*args, "--ckpt_path", "last"], tmp_path)
    assert_same_updates(full_run, root / "version_0", (1, 2, 3))
