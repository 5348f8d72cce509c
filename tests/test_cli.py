"""The real entry points (`python train.py`, `lit-rlhf`) in subprocesses, and every shipped config."""

import glob
import json
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
    """A second --config that points configs/ppo_tiny.yaml at the tiny assets; runs go to ``root/version_<N>``."""
    override = {
        "trainer": {"default_root_dir": str(root)},
        "model": {
            "init_args": {
                "models": {"actor_path": assets["policy"]},
                "rewards": [{"class_path": "lit_rlhf.rewards.RewardModel", "init_args": {"path": assets["reward"]}}],
                "rollout": {"rollout_batch_size": 64, "score_micro_batch_size": 64},
                "algorithm": {"mini_batch_size": 32, "micro_batch_size": 32},
            }
        },
        "data": {"init_args": {"path": assets["prompts"], "val_path": assets["val_prompts"], "val_batch_size": 64}},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    return ["--config", str(root / "override.yaml")]


def read_metrics(run_dir):
    import pandas as pd

    return pd.read_csv(Path(run_dir) / "metrics.csv")


def config_args(config: str, assets: dict[str, str]) -> list[str]:
    """``--config`` plus the overrides that point a shipped config at the tiny assets on a CPU."""
    with open(config) as f:
        model_class = yaml.safe_load(f)["model"]["class_path"]
    path_arg = "models.actor_path" if model_class.endswith("PPOModule") else "models.path"
    args = ["--config", config, f"--model.init_args.{path_arg}", assets["policy"]]
    args += ["--data.init_args.path", assets["prompts"], "--trainer.logger", "false"]
    if not torch.cuda.is_available():
        args += ["--trainer.accelerator", "cpu"]  # GPU configs still parse and build on a CPU machine
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.relpath(c, ROOT) for c in CONFIGS])
def test_every_shipped_config_instantiates_and_print_config_round_trips(config, tiny_assets, tmp_path, capsys):
    """Every YAML builds its module, datamodule and trainer; ``--print_config`` output parses back to itself."""
    from lit_rlhf.cli import LitRLHFCLI

    args = config_args(config, tiny_assets)
    cli = LitRLHFCLI(args=args, run=False)
    assert cli.model.models.__dict__.get("actor_path", cli.model.models.__dict__.get("path")) == tiny_assets["policy"]
    assert cli.trainer is not None and cli.datamodule is not None
    with pytest.raises(SystemExit):
        LitRLHFCLI(args=["fit", *args, "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        LitRLHFCLI(args=["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    config_only = {k: v for k, v in yaml.safe_load(printed).items() if k not in ("ckpt_path", "weights_only")}
    (tmp_path / "config_only.yaml").write_text(yaml.safe_dump(config_only))
    again = LitRLHFCLI(args=["--config", str(tmp_path / "config_only.yaml")], run=False)
    assert again.model.hparams == cli.model.hparams


@pytest.mark.parametrize("logger", ["false", "true"])
def test_logger_false_still_keeps_metrics_csv_in_the_run_folder(tiny_assets, tmp_path, logger):
    """``--trainer.logger false`` turns W&B off; the CSV log every run keeps stays, in the run folder."""
    from lit_rlhf.cli import LitRLHFCLI, RunCSVLogger

    args = config_args(os.path.join(ROOT, "configs", "ppo_tiny.yaml"), tiny_assets)
    args += ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", logger]
    cli = LitRLHFCLI(args=args, run=False)
    assert [type(lg) for lg in cli.trainer.loggers] == [RunCSVLogger]
    assert os.path.normpath(cli.trainer.loggers[0].log_dir) == str(tmp_path / "runs" / "version_0")


def test_groups_from_the_cli_reach_the_module(tiny_assets):
    """A nested group field set on the command line is the value the module uses."""
    from lit_rlhf.cli import LitRLHFCLI

    args = config_args(os.path.join(ROOT, "configs", "ppo_tiny_verifiable.yaml"), tiny_assets)
    args += ["--model.init_args.generation.max_new_tokens", "8", "--model.init_args.kl.coef", "0.2"]
    args += ["--model.init_args.models.lora.rank", "4", "--model.init_args.optim.actor.max_grad_norm", "0.5"]
    module = LitRLHFCLI(args=args, run=False).model
    assert module.generation.max_new_tokens == 8 and module.kl.coef == 0.2 and module.kl_controller.value == 0.2
    assert module.models.lora.rank == 4 and module.optim.actor.max_grad_norm == 0.5
    assert [(c.name, c.weight) for c in module.rewards] == [("reward_model", 1.0), ("exact_match_reward", 0.5)]
    actor_optimizer = module.optim.actor.optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(actor_optimizer, torch.optim.AdamW) and actor_optimizer.defaults["lr"] == 1e-4


def test_a_bad_setting_is_named_before_any_model_loads(tiny_assets, tmp_path):
    args = config_args(os.path.join(ROOT, "configs", "ppo_tiny.yaml"), tiny_assets)
    out = run(["fit", *args, "--model.init_args.algorithm.lam", "5"], tmp_path, check=False)
    assert out.returncode != 0
    assert "algorithm.lam must be in [0, 1], got 5" in out.stderr


@pytest.mark.slow
def test_fit_resume_export_through_train_py(tiny_assets, tmp_path):
    root = tmp_path / "run"
    config = os.path.join(ROOT, "configs", "ppo_tiny.yaml")
    base = ["--config", config, *tiny_overrides(tiny_assets, root)]
    run(["fit", *base, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"], tmp_path)
    run_dir = root / "version_0"
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
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
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    first = torch.load(ckpt, weights_only=True)
    run_id, first_epoch = first["wandb_run_id"], first["epoch"]
    logged = read_metrics(run_dir).dropna(subset=["reward/mean"])["epoch"].tolist()
    # resume for one more epoch: the same run folder and W&B run, the epoch counter and the CSV log continue
    run(["fit", *base, "--trainer.max_epochs", "3", "--ckpt_path", str(ckpt)], tmp_path)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["version_0"]
    assert torch.load(ckpt, weights_only=True)["epoch"] == first_epoch + 1
    assert len(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))) == 2
    assert read_metrics(run_dir).dropna(subset=["reward/mean"])["epoch"].tolist() == [*logged, 2]
    # export to Hugging Face format; the exported actor reproduces the checkpoint's actor
    export_dir = tmp_path / "export"
    out = run(["export", *base, "--ckpt_path", str(ckpt), "--export_dir", str(export_dir)], tmp_path)
    assert "exported actor" in out.stdout
    exported = AutoModelForCausalLM.from_pretrained(export_dir / "actor")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(exported.lm_head.weight, state["actor.model.lm_head.weight"])
    assert (export_dir / "critic" / "config.json").exists()
    assert (export_dir / "actor" / "tokenizer.json").exists()


@pytest.mark.slow
def test_two_runs_of_one_config_leave_two_complete_run_folders(tiny_assets, tmp_path):
    root = tmp_path / "runs"
    args = ["fit", "--config", os.path.join(ROOT, "configs", "ppo_tiny.yaml"), *tiny_overrides(tiny_assets, root)]
    args += ["--trainer.max_epochs", "1", "--model.init_args.log_samples_every_n_rollouts", "1"]
    run(args, tmp_path)
    run(args, tmp_path)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["version_0", "version_1"]
    for folder in folders:
        run_dir = root / folder
        for name in ("config.yaml", "metrics.csv", "metrics.png", "samples.jsonl", "checkpoints/last.ckpt"):
            assert (run_dir / name).is_file(), (folder, name)
        assert (run_dir / "export" / "actor" / "model.safetensors").is_file()
        assert len(glob.glob(str(run_dir / "wandb" / "offline-run-*"))) == 1
        assert "reward/mean" in read_metrics(run_dir).columns
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 8 and {"prompt", "response", "reward", "score", "reward_model"} <= set(samples[0])
    first, second = ((root / v / "config.yaml").read_text() for v in folders)
    assert "version_0" in first and first.replace("version_0", "version_1") == second, "same settings, own folder"


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
        "--trainer.max_epochs",
        "1",
    ]
    run(["fit", *args], tmp_path)
    assert "reward/mean" in read_metrics(root / "version_0").columns
    out = run(["validate", *args], tmp_path)
    assert "val/reward" in out.stdout


@pytest.mark.slow
def test_two_reward_components_through_the_cli_log_each_and_their_weighted_sum(tiny_assets, tmp_path):
    """configs/ppo_tiny_verifiable.yaml: the reward model (weight 1) + exact match on the answer column (0.5)."""
    root = tmp_path / "run"
    config = os.path.join(ROOT, "configs", "ppo_tiny_verifiable.yaml")
    overrides = tiny_overrides(tiny_assets, root)
    rewards = [
        {"class_path": "lit_rlhf.rewards.RewardModel", "init_args": {"path": tiny_assets["reward"], "weight": 1.0}},
        {
            "class_path": "lit_rlhf.rewards.RewardFunction",
            "init_args": {"fn": "lit_rlhf.tasks.arithmetic.exact_match_reward", "weight": 0.5},
        },
    ]
    override = yaml.safe_load((root / "override.yaml").read_text())
    override["model"]["init_args"]["rewards"] = rewards
    override["model"]["init_args"]["generation"] = {"max_new_tokens": 4, "suppress_token_ids": [0, 1]}
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    run(["fit", "--config", config, *overrides, "--trainer.max_epochs", "3"], tmp_path)
    import pandas as pd

    frame = pd.read_csv(glob.glob(str(root / "**" / "metrics.csv"), recursive=True)[0])
    rollouts = frame.dropna(subset=["reward/score"])
    assert len(rollouts) == 3
    for _, row in rollouts.iterrows():
        weighted = row["reward/reward_model"] + 0.5 * row["reward/exact_match_reward"]
        assert row["reward/score"] == pytest.approx(weighted, rel=1e-5, abs=1e-6)
        # reward/mean is what PPO trains on: the score after the missing-EOS penalty of the config
        assert row["reward/mean"] <= row["reward/score"] + 1e-6
    assert set(rollouts["reward/exact_match_reward"]) <= {i / 64 for i in range(65)}  # 64 prompts, 0/1 each


def test_console_script_is_declared():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert "lit-rlhf = lit_rlhf.cli:main" in cfg["options.entry_points"]["console_scripts"]
