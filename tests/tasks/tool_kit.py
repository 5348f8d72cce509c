"""The embedded tool-use task for tests: its files, an SFT policy trained through train.py with
configs/sft_tools_tiny.yaml, and the arguments of a configs/grpo_tools_tiny.yaml run on them."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from lit_rlhf.tasks import tool_use

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ROOT}


def train(args, cwd, check=True, processes=1):
    """``train.py`` in a subprocess (``processes > 1``: one thread per process)."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=cwd,
        env={**ENV, "OMP_NUM_THREADS": "1"} if processes > 1 else ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def build_tool_sft(root):
    """The task's files under ``root/assets`` (fewer RL prompts) and its SFT policy in ``assets/sft``,
    trained by configs/sft_tools_tiny.yaml as ``make demo-tools`` trains it (about 2.5 minutes)."""
    assets = root / "assets"
    tool_use.prepare(str(assets), rl_prompts=1024, test_prompts=256)
    overrides = {
        "model.init_args.models.path": assets / "base",
        "model.init_args.export_dir": assets / "sft",
        "data.init_args.path": assets / "sft.jsonl",
        "data.init_args.val_path": assets / "sft_val.jsonl",
        "trainer.default_root_dir": root / "sft_runs",
        "trainer.enable_progress_bar": "false",
    }
    args = ["fit", "--config", os.path.join(ROOT, "configs", "sft_tools_tiny.yaml")]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    train(args, root)
    return assets


def grpo_args(assets, root, epochs, extra=()):
    """``train.py`` arguments of configs/grpo_tools_tiny.yaml on the task's files, its run in ``root/version_0``."""
    override = {
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
        },
        "model": {"init_args": {"models": {"actor_path": str(assets / "sft")}, "log_samples_every_n_rollouts": 1}},
        "data": {"init_args": {"path": str(assets / "prompts.jsonl"), "val_path": str(assets / "test_prompts.jsonl")}},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    config = os.path.join(ROOT, "configs", "grpo_tools_tiny.yaml")
    return ["fit", "--config", config, "--config", str(root / "override.yaml"), *extra]
