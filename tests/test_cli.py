"""The real entry points (`python train.py`, `lit-rlhf`) in subprocesses, and every shipped config."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
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


def tiny_overrides(assets, root) -> list[str]:
    """A second --config that points configs/ppo_tiny.yaml at the tiny assets and a temporary run dir."""
    override = {
        "trainer": {
            "default_root_dir": str(root),
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "lit-rlhf", "save_dir": str(root)},
                },
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
            ],
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0},
                },
            ],
        },
        "model": {
            "init_args": {
                "actor_path": assets["policy"],
                "reward_path": assets["reward"],
                "export_dir": str(root / "export"),
                "rollout_batch_size": 64,
                "score_micro_batch_size": 64,
                "mini_batch_size": 32,
                "micro_batch_size": 32,
            }
        },
        "data": {"init_args": {"path": assets["prompts"], "val_path": assets["val_prompts"], "val_batch_size": 64}},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    return ["--config", str(root / "override.yaml")]


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.relpath(c, ROOT) for c in CONFIGS])
def test_every_shipped_config_instantiates(config, tiny_assets):
    """Every YAML parses and builds its module, datamodule and trainer (model paths pointed at tiny assets)."""
    from lit_rlhf.cli import LitRLHFCLI

    with open(config) as f:
        model_class = yaml.safe_load(f)["model"]["class_path"]
    path_arg = "actor_path" if model_class.endswith("PPOModule") else "model_path"
    args = [
        "--config",
        config,
        f"--model.init_args.{path_arg}",
        tiny_assets["policy"],
        "--data.init_args.path",
        tiny_assets["prompts"],
        "--trainer.logger",
        "false",
    ]
    if not torch.cuda.is_available():
        args += ["--trainer.accelerator", "cpu"]  # GPU configs still parse and build on a CPU machine
    cli = LitRLHFCLI(args=args, run=False)
    assert getattr(cli.model.hparams, path_arg) == tiny_assets["policy"]
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
    for key in (
        b"reward/mean",
        b"rollout/kl",
        b"policy/loss",
        b"critic/loss",
        b"val/reward",
        b"val/accuracy",
        b"samples/rollout_0",
    ):
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
