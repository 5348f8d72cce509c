"""DDP and FSDP2 (ModelParallelStrategy) for real: two CPU processes with gloo, launched by torchrun."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "distributed", "worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


# A gloo rank now and then aborts in C++ after its work is done (``terminate called without an active
# exception``, SIGABRT, seen in about one full suite in three, never alone in a loop of the same launch):
# that one signature gets one more launch; any other failure, or the same one twice, fails the test.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def launch(args, tmp_path, processes=2):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = torchrun + args if processes > 1 else [sys.executable, *args]
    for attempt in (1, 2):
        out = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or GLOO_TEARDOWN_ABORT not in out.stderr or attempt == 2:
            break
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def one_step_per_strategy(mode: str, tiny_assets, root) -> dict:
    """The worker's ``mode`` step in one process and on two ranks (DDP, FSDP2): ``{strategy: (state,
    export dir)}``."""
    assets = os.path.dirname(tiny_assets["policy"])
    results = {}
    for strategy, processes in (("single", 1), ("ddp", 2), ("fsdp", 2)):
        out = str(root / f"{strategy}.pt")
        launch([WORKER, mode, "--strategy", strategy, "--assets", assets, "--out", out], root, processes)
        results[strategy] = (torch.load(out), out + ".export")
    return results


@pytest.fixture(scope="module")
def one_step(tiny_assets, tmp_path_factory):
    """One optimizer step on a fixed 8-row buffer: one process, and two ranks of 4 rows (DDP, FSDP2)."""
    return one_step_per_strategy("train", tiny_assets, tmp_path_factory.mktemp("one_step"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_update_like_one_process_with_the_combined_batch(one_step, tiny_assets, strategy):
    single, distributed = one_step["single"][0], one_step[strategy][0]
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets["policy"]).state_dict()
    moved = max((single[f"actor.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3, "the step must change the weights for the comparison to mean anything"
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_fsdp2_export_loads_in_plain_transformers_with_the_sharded_log_probs(one_step):
    state, export_dir = one_step["fsdp"]
    model = AutoModelForCausalLM.from_pretrained(f"{export_dir}/actor")
    from lit_rlhf.models import Actor

    sequences = _worker_sequences()
    log_probs = Actor(model, [2], 0)(sequences, torch.ones_like(sequences), 5)
    torch.testing.assert_close(log_probs, state["log_probs"], atol=1e-5, rtol=1e-5)
    assert os.path.exists(f"{export_dir}/critic/model.safetensors")


def _worker_sequences():
    """The first two of the worker's fixed sequences (same seed, same draws)."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 14, (1, 40), generator=g).expand(8, -1)
    prompts = torch.cat([shared, torch.randint(3, 14, (8, 6), generator=g)], 1)
    responses = torch.randint(3, 14, (8, 5), generator=g)
    return torch.cat([prompts, responses], 1)[:2]


def test_whitening_and_rollout_statistics_reduce_across_ranks(tmp_path):
    launch([WORKER, "stats", "--out", str(tmp_path / "stats.json")], tmp_path)
    result = json.loads((tmp_path / "stats.json").read_text())
    assert result["whiten_max_diff"] < 1e-5 and result["metrics_max_diff"] < 1e-5, result
    assert result["zero_std_fraction"] == 0.5  # two of the four pairs, one on each rank


def two_process_run(tiny_assets, root, strategy: str, val_every: int, init_args: dict) -> list[str]:
    """``train.py fit`` arguments for a 2-process run of ``configs/ppo_tiny.yaml`` on the tiny assets in
    ``root`` (``strategy``: ddp or fsdp2, ``init_args`` on top of the policy and reward model)."""
    override = {
        "trainer": {
            "devices": 2,
            "max_epochs": 2,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "check_val_every_n_epoch": val_every,
            "strategy": "ddp"
            if strategy == "ddp"
            else {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
        },
        "model": {
            "init_args": {
                "models": {"actor_path": tiny_assets["policy"]},
                "rewards": [
                    {"class_path": "lit_rlhf.rewards.RewardModel", "init_args": {"path": tiny_assets["reward"]}}
                ],
                **init_args,
            }
        },
        "data": {
            "init_args": {"path": tiny_assets["prompts"], "val_path": tiny_assets["val_prompts"], "val_batch_size": 32}
        },
    }
    root.mkdir(parents=True)
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    return [
        os.path.join(ROOT, "train.py"),
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "ppo_tiny.yaml"),
        "--config",
        str(root / "override.yaml"),
    ]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_cli_fit_resume_and_export_on_two_processes(tiny_assets, tmp_path, strategy):
    root = tmp_path / "run"
    init_args = {
        "rollout": {"rollout_batch_size": 32, "score_micro_batch_size": 32},
        "algorithm": {"mini_batch_size": 16, "micro_batch_size": 8},
    }
    base = two_process_run(tiny_assets, root, strategy, 1, init_args)
    launch(base, tmp_path, processes=1)  # Lightning starts the second process itself
    # both ranks agreed on one run folder (the second inherits the first one's choice)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["version_0"]
    run_dir = root / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists() and (last.is_dir() == (strategy == "fsdp2")), "FSDP2 saves a sharded checkpoint folder"
    launch([*base, "--trainer.max_epochs", "3", "--ckpt_path", str(last)], tmp_path, processes=1)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["version_0"], "the resumed run continues its folder"
    metrics = (run_dir / "metrics.csv").read_text()
    assert "reward/mean" in metrics and ",2," in metrics, "the resumed run trained epoch 2"
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "actor")
    assert exported.config.vocab_size > 0


@pytest.mark.parametrize("strategy, engine", [("ddp", "native"), ("fsdp2", "native"), ("fsdp2", "separate")])
def test_asynchronous_rollouts_on_two_processes_keep_each_ranks_rows_through_a_resume(
    tiny_assets, tmp_path, strategy, engine
):
    """Each rank carries its own rows over (its own prompt stream), the checkpoint holds both ranks'
    in-flight rows, and the resumed run goes on from them within the staleness bound; with a
    ``SeparateEngine`` per rank (FSDP2: the shards gathered for its push), one rollout ahead."""
    root = tmp_path / "run"
    init_args = {
        "generation": {"max_new_tokens": 12},
        "rollout": {
            "rollout_batch_size": 16,
            "score_micro_batch_size": 16,
            "asynchronous": {"max_staleness": 1, "over_provision": 8, "segment_tokens": 3},
        },
        "algorithm": {"mini_batch_size": 16, "micro_batch_size": 8, "rollout_correction": "decoupled"},
        "val_before_train": False,
    }
    if engine == "separate":
        init_args["rollout"]["engine"] = {"class_path": "lit_rlhf.rollout.SeparateEngine"}
        init_args["rollout"]["asynchronous"] = {"max_staleness": 1, "carry_over": False}
    base = two_process_run(tiny_assets, root, strategy, 100, init_args)
    launch(base, tmp_path, processes=1)
    run_dir = root / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    if strategy == "ddp":
        states = torch.load(last, weights_only=False)["rollout_in_flight"]
        assert len(states) == 2 and all(s["rollout"] == 1 for s in states)
        rows = [(r, g["position"]) for r, s in enumerate(states) for g in s["after"]["groups"]]
        assert rows and {r for r, _ in rows} == {0, 1}, "both ranks carried rows over"
    launch([*base, "--trainer.max_epochs", "3", "--ckpt_path", str(last)], tmp_path, processes=1)
    frame = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["rollout/staleness_max"]).sort_values("epoch")
    assert frame.epoch.tolist() == [0, 1, 2]
    if engine == "separate":  # rollout k was generated with the weights of rollout k - 1
        assert frame["rollout/staleness_max"].tolist() == [0.0, 1.0, 1.0]
    else:  # the rows carried over into the checkpoint are due in rollout 2: trained there, a version late
        assert (frame["rollout/staleness_max"] <= 1).all() and frame["rollout/carried_over_rows"].gt(0).any()
        assert frame["rollout/staleness_max"].tolist()[-1] == 1.0, "the resumed run went on from the saved rows"
