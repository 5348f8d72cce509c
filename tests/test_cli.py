"""The real entry points (`python train.py`, `lit-rlhf`) in subprocesses, and every shipped config."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def run(args, tmp_path, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def tiny_overrides(assets, root):
    return [
        "--model.init_args.actor_path",
        assets["policy"],
        "--model.init_args.reward_path",
        assets["reward"],
        "--data.init_args.path",
        assets["prompts"],
        "--data.init_args.val_path",
        assets["val_prompts"],
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.relpath(c, ROOT) for c in CONFIGS])
def test_every_shipped_config_instantiates(config, tiny_assets):
    from lit_rlhf.cli import LitRLHFCLI

    cli = LitRLHFCLI(
        args=[
            "--config",
            config,
            "--model.init_args.actor_path",
            tiny_assets["policy"],
            "--data.init_args.path",
            tiny_assets["prompts"],
            "--trainer.logger",
            "false",
            *([] if torch.cuda.is_available() else ["--trainer.accelerator", "cpu"]),  # GPU configs on CPU CI
        ],
        run=False,
    )
    assert cli.model.hparams.actor_path == tiny_assets["policy"]
    assert cli.trainer is not None and cli.datamodule is not None


@pytest.mark.slow
def test_fit_resume_export_through_train_py(tiny_assets, tmp_path):
    root = tmp_path / "run"
    config = os.path.join(ROOT, "configs", "ppo_tiny.yaml")
    base = ["--config", config, *tiny_overrides(tiny_assets, root)]
    out = run(
        [
            "fit",
            *base,
            "--trainer.max_epochs",
            "2",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--trainer.callbacks.dirpath",
            str(root / "checkpoints"),
        ],
        tmp_path,
    )
    runs = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    data = Path(runs[0]).read_bytes()
    for key in (b"reward/mean", b"rollout/kl", b"policy/loss", b"critic/loss", b"val/reward", b"samples/rollout_0"):
        assert key in data, key
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    first = torch.load(ckpt, weights_only=False)
    run_id, first_epoch = first["wandb_run_id"], first["epoch"]
    # resume for one more epoch: same W&B run id, epoch counter continues
    run(
        [
            "fit",
            *base,
            "--trainer.max_epochs",
            "3",
            "--ckpt_path",
            str(ckpt),
            "--trainer.callbacks.dirpath",
            str(root / "checkpoints"),
        ],
        tmp_path,
    )
    assert torch.load(ckpt, weights_only=False)["epoch"] == first_epoch + 1
    assert len(glob.glob(str(root / "wandb" / f"offline-run-*-{run_id}"))) == 2
    # export to Hugging Face format; the exported actor reproduces the checkpoint's actor
    export_dir = tmp_path / "export"
    out = run(["export", *base, "--ckpt_path", str(ckpt), "--export_dir", str(export_dir)], tmp_path)
    assert "exported actor" in out.stdout
    exported = AutoModelForCausalLM.from_pretrained(export_dir / "actor")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    torch.testing.assert_close(exported.lm_head.weight, state["actor.model.lm_head.weight"])
    assert (export_dir / "critic" / "config.json").exists()
    assert (export_dir / "actor" / "tokenizer.json").exists()


@pytest.mark.slow
def test_custom_reward_subclass_through_class_path_and_validate(tiny_assets, tmp_path):
    root = tmp_path / "run"
    config = os.path.join(ROOT, "configs", "ppo_tiny.yaml")
    args = [
        "--config",
        config,
        *tiny_overrides(tiny_assets, root),
        "--model.class_path",
        "tests.helpers.SevensPPO",
        "--model.init_args.reward_path",
        "null",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.max_epochs",
        "1",
    ]
    run(["fit", *args], tmp_path)
    metrics = Path(glob.glob(str(root / "**" / "metrics.csv"), recursive=True)[0]).read_text()
    assert "reward/mean" in metrics.splitlines()[0]
    out = run(["validate", *args], tmp_path)
    assert "val/reward" in out.stdout


def test_console_script_is_declared():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert "lit-rlhf = lit_rlhf.cli:main" in cfg["options.entry_points"]["console_scripts"]
