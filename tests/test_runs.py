"""Runs a person can follow: the CLI's help, conversational prompts end to end, plots, metrics, progress."""

import json
import os
import subprocess
import sys

import lightning as L
import pandas as pd
import pytest
import yaml
from PIL import Image

from lit_rlhf.plot import figure, plot_run
from lit_rlhf.rollout.progress import PhaseProgress
from tests.helpers import SevensPPO, datamodule, small_module, trainer
from tests.test_cli import ROOT, run


def spy_reward(prompts, responses):
    """Records the prompts it was given (to the file named by SPY_PATH); rewards response length."""
    with open(os.environ["SPY_PATH"], "a") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    return [float(len(r)) for r in responses]


def test_help_points_to_every_setting_and_only_working_subcommands_are_offered(tmp_path):
    top = run(["fit", "--help"], tmp_path).stdout
    assert "--model.help PPOModule" in "\n".join(top.splitlines()[:6]), "the first lines point to the settings"
    settings = run(["fit", "--model.help", "PPOModule"], tmp_path).stdout
    for flag, help_line in [
        ("--model.generation.max_new_tokens", "response length limit"),
        ("--model.kl.coef", "KL coefficient beta"),
        ("--model.models.lora.rank", "LoRA rank"),
        ("--model.algorithm.advantage_estimator", "gae"),
    ]:
        block = settings[settings.index(f"  {flag} ") :][:400]
        assert help_line in block, (flag, block)
    export = run(["export", "--help"], tmp_path).stdout
    assert "--ckpt_path" in export and "--export_dir" in export and "--merge_lora" in export
    for args, message in [
        (["test", "--config", "x.yaml"], "invalid choice: 'test' (choose from 'fit', 'validate')"),
        (["fit", "--optimizer", "Adam"], "unrecognized arguments: --optimizer Adam"),
    ]:
        out = run(args, tmp_path, check=False)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-500:]


@pytest.mark.slow
def test_messages_dataset_with_a_chatml_template_reaches_the_reward_with_the_generation_prompt(chatml_assets, tmp_path):
    spy = tmp_path / "prompts.jsonl"
    override = {
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "max_epochs": 1, "limit_val_batches": 0},
        "model": {
            "init_args": {
                "models": {"actor_path": chatml_assets["policy"], "critic_path": chatml_assets["reward"]},
                "rewards": [
                    {"class_path": "lit_rlhf.rewards.RewardFunction", "init_args": {"fn": "tests.test_runs.spy_reward"}}
                ],
                "rollout": {"rollout_batch_size": 16, "score_micro_batch_size": 16},
                "algorithm": {"mini_batch_size": 16, "micro_batch_size": 16},
            }
        },
        "data": {
            "init_args": {
                "path": chatml_assets["prompts"],
                "val_path": None,
                "field": "messages",
                "max_prompt_len": 128,
            }
        },
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    config = os.path.join(ROOT, "configs", "ppo_tiny.yaml")
    env = {**os.environ, "SPY_PATH": str(spy), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ROOT}
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "fit",
        "--config",
        config,
        "--config",
        str(tmp_path / "override.yaml"),
    ]
    command += ["--data.init_args.apply_chat_template", "true"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    prompts = [json.loads(line) for line in spy.read_text().splitlines()]
    assert len(prompts) == 16
    for prompt in prompts:
        assert prompt.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nAdd ")
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n"), "the generation prompt closes every prompt"
        assert "[{" not in prompt and "'role'" not in prompt, "no Python list repr"


def test_plot_has_one_panel_per_metric_and_needs_no_val_accuracy(tiny_assets, tmp_path):
    L.seed_everything(0, verbose=False)
    module = small_module(tiny_assets, SevensPPO)
    t = trainer(tmp_path, 2, limit_val_batches=1, check_val_every_n_epoch=1)
    t.fit(module, datamodule=datamodule(tiny_assets))
    run_dir = t.log_dir
    out = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.plot", run_dir],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    png = os.path.join(run_dir, "metrics.png")
    assert Image.open(png).format == "PNG"
    frame = pd.read_csv(os.path.join(run_dir, "metrics.csv"))
    assert "val/accuracy" not in frame.columns
    fig, metrics = figure(frame)
    assert metrics == ["reward/mean", "rollout/kl", "rollout/response_length", "val/kl", "val/reward"]
    assert len(fig.axes) == len(metrics)
    assert plot_run(os.path.dirname(run_dir))[0] == png, "a config's root plots its newest run"


def test_training_metrics_land_every_step_whatever_log_every_n_steps_says(tiny_assets, tmp_path):
    L.seed_everything(0, verbose=False)
    module = small_module(tiny_assets, SevensPPO)
    t = trainer(tmp_path, 2, log_every_n_steps=50)
    t.fit(module, datamodule=datamodule(tiny_assets))
    steps = pd.read_csv(os.path.join(t.log_dir, "metrics.csv")).dropna(subset=["policy/loss"])
    # 16 experiences / mini-batch 8 x 2 PPO epochs = 4 optimizer steps per rollout, 2 rollouts
    assert len(steps) == 8 and t.log_every_n_steps == 1


def test_the_progress_bar_shows_each_phase_with_a_count(tiny_assets, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(PhaseProgress, "describe", lambda self, text: shown.append(text))
    monkeypatch.setattr(PhaseProgress, "interval", 0.0, raising=False)
    L.seed_everything(0, verbose=False)
    module = small_module(tiny_assets, SevensPPO)
    t = trainer(tmp_path, 1, enable_progress_bar=True)
    t.fit(module, datamodule=datamodule(tiny_assets))
    assert shown[0] == "Epoch 0 · generating 0/4" or shown[0] == "Epoch 0 · generating 1/4"
    assert "Epoch 0 · scoring 5/5" in shown, shown  # 2 chunks x (reference, critic) + the rewards
    assert shown[-1] == "Epoch 0 · training"
    assert shown.index("Epoch 0 · scoring 5/5") > max(i for i, s in enumerate(shown) if "generating" in s)


def test_a_fit_from_python_prints_what_the_cli_prints(tiny_assets, tmp_path, recwarn):
    """No Lightning adverts, no deprecation warnings from lit_rlhf's own calls, no ``v_num`` and no
    ``Epoch 8/-2`` in a step-counted run's progress bar: a Trainer and a PPOModule built in Python."""
    import logging

    from lightning.pytorch.callbacks import RichProgressBar

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tips.addHandler(handler)
    try:
        bar = RichProgressBar()
        t = L.Trainer(
            accelerator="cpu",
            max_steps=8,
            max_epochs=-1,
            default_root_dir=str(tmp_path),
            limit_val_batches=0,
            callbacks=[bar],
            enable_model_summary=False,
        )
        models = {"actor_path": tiny_assets["policy"], "new_value_head": True, "gradient_checkpointing": True}
        module = small_module(tiny_assets, SevensPPO, models={**models, "lora": {"rank": 4}})
        t.fit(module, datamodule=datamodule(tiny_assets))
    finally:
        tips.removeHandler(handler)
    assert not [r.getMessage() for r in records if "Tip:" in r.getMessage()]
    deprecations = [str(w.message) for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecations == [], deprecations
    assert t.global_step == 8 and t.loggers, "a step-counted run with a logger (which has a version)"
    assert "v_num" not in bar.get_metrics(t, module)
    assert bar._get_train_description(8).strip() == "Epoch 8"
