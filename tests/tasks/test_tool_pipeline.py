"""The embedded tool-use task end to end through train.py: SFT on calculator conversations, then GRPO
and PPO (GAE) with the calculator, which must raise the held-out tool-call rate and accuracy; a
resumed run repeats the uninterrupted one bit for bit; two DDP processes run the tool loop."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lit_rlhf.checkpoints import load_checkpoint_file
from lit_rlhf.tasks import tool_use
from tests.tasks.tool_kit import ROOT, build_tool_sft, grpo_args, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tool_sft(tmp_path_factory):
    return build_tool_sft(tmp_path_factory.mktemp("tools"))


def validations(run_dir) -> list[dict]:
    return tool_use.held_out(str(run_dir / "metrics.csv"))


def check_trained_tokens_are_the_policys(run_dir):
    """``trained_text`` is the policy's own turns: never the calculator's answers, which the reward saw."""
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    called = [r for r in rows if r["tool_calls"] > 0 and len(r["messages"]) >= 4]
    assert called, "some logged trajectories called the calculator"
    for r in called:
        tool_text = next(m["content"] for m in r["messages"] if m["role"] == "tool")
        assert "<tool_response>" not in r["trained_text"] and "<tool_call>" in r["trained_text"]
        turns = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert r["trained_text"] == "".join(turns)  # exactly the assistant turns (their <|im_end|> is special)
        assert tool_text in r["response"]  # the decoded response holds the tool's answer as context


GAE = [
    "--model.init_args.algorithm.advantage_estimator",
    "gae",
    "--model.init_args.generation.n_samples_per_prompt",
    "1",
    "--model.init_args.rollout.rollout_batch_size",
    "128",
    "--model.init_args.algorithm.gamma",
    "1.0",
    "--model.init_args.algorithm.lam",
    "1.0",
]


@pytest.mark.parametrize("estimator, extra", [("grpo", []), ("gae", GAE)])
def test_rl_with_the_calculator_raises_tool_use_and_held_out_accuracy(tool_sft, tmp_path, estimator, extra):
    root = tmp_path / estimator
    train(grpo_args(tool_sft, root, 10, extra), tmp_path)
    run_dir = root / "version_0"
    points = validations(run_dir)
    assert [p["epoch"] for p in points] == [0, 4, 9]  # before training, then every 5 rollouts
    before, after = points[0], points[-1]
    print(estimator, points)
    assert 0.1 < before["tool_call_rate"] < 0.8, before  # the SFT policy calls the tool only sometimes
    # measured (GRPO, make demo-tools' SFT policy, this machine): accuracy 0.344 -> 0.590 and tool calls
    # 0.48 -> 0.87 after 10 rollouts
    assert after["tool_call_rate"] > before["tool_call_rate"] + 0.2, points
    assert after["accuracy"] > before["accuracy"] + 0.12, points
    frame = pd.read_csv(run_dir / "metrics.csv")
    assert frame["tools/calculator/calls"].dropna().gt(0).all()
    assert frame["rollout/observation_tokens"].dropna().gt(0).all()
    check_trained_tokens_are_the_policys(run_dir)


def steps(run_dir):
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.dropna(subset=["policy/loss"]).drop_duplicates(subset=["epoch", "step"], keep="last")


def test_a_run_killed_mid_rollout_resumes_bit_identically(tool_sft, tmp_path):
    no_val = ["--trainer.check_val_every_n_epoch", "100", "--model.init_args.val_before_train", "false"]
    train(grpo_args(tool_sft, tmp_path / "full", 3, no_val), tmp_path)
    kill = {"class_path": "tests.faults.KillAt", "init_args": {"epoch": 1, "batch": 1}}
    config = yaml.safe_load(Path(ROOT, "configs", "grpo_tools_tiny.yaml").read_text())
    callbacks = config["trainer"]["callbacks"] + [kill]
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    args = grpo_args(tool_sft, tmp_path / "killed", 3, no_val)
    killed = train([*args, "--config", str(tmp_path / "kill.yaml")], tmp_path, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = tmp_path / "killed" / "version_0"
    assert load_checkpoint_file(str(run_dir / "checkpoints" / "last.ckpt"))["epoch"] == 0
    train([*args, "--ckpt_path", "last"], tmp_path)
    full, resumed = steps(tmp_path / "full" / "version_0"), steps(run_dir)
    for epoch in (1, 2):
        a, b = full[full.epoch == epoch], resumed[resumed.epoch == epoch]
        assert len(a) == 2  # 128 trajectories / mini-batches of 64
        for key in ("policy/loss", "policy/grad_norm"):
            assert a[key].tolist() == b[key].tolist(), (epoch, key)  # bit-identical, not approximately
    rollouts = lambda d: pd.read_csv(d / "metrics.csv").dropna(subset=["rollout/tool_calls"])  # noqa: E731
    a, b = rollouts(tmp_path / "full" / "version_0"), rollouts(run_dir)
    assert a[a.epoch >= 1]["rollout/tool_calls"].tolist() == b[b.epoch >= 1]["rollout/tool_calls"].tolist()


def test_two_ddp_processes_run_the_tool_loop(tool_sft, tmp_path):
    root = tmp_path / "ddp"
    extra = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.init_args.rollout.rollout_batch_size", "8"]
    train(grpo_args(tool_sft, root, 2, extra), tmp_path, processes=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["version_0"]
    frame = pd.read_csv(root / "version_0" / "metrics.csv")
    assert frame["rollout/tool_calls"].dropna().gt(0).all() and frame["tools/calculator/calls"].dropna().gt(0).all()
    points = validations(root / "version_0")
    assert len(points) == 1 and 0 <= points[0]["accuracy"] <= 1  # validated before training
    assert (root / "version_0" / "checkpoints" / "last.ckpt").exists()
