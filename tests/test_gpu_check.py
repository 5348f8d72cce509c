"""``python -m lit_rlhf.gpu_check --dry-run``: the GPU check's checks on CPU with a tiny Qwen2, so it cannot rot."""

import json
import os
import subprocess
import sys

import pytest

from lit_rlhf import gpu_check
from tests.test_cli import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, done


@pytest.mark.slow
def test_the_dry_run_passes_every_check_it_can_run_on_cpu_and_reports_numbers(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    results = {r["name"]: r for r in report["checks"]}
    assert list(results) == [check.name for check in gpu_check.CHECKS]
    for name in ("ppo_gae", "grpo", "ppo_gae_checkpointing", "grpo_lora", "step_single", "step_fsdp2"):
        assert results[name]["status"] == "pass", results[name]
    for name in ("grpo_flash_attention_2", "step_fsdp1"):  # GPU-only, said so
        assert results[name]["status"] == "skip" and "GPU" in results[name]["reason"]
    for name in ("ppo_gae", "grpo", "ppo_gae_checkpointing", "grpo_lora"):
        n = results[name]["numbers"]
        assert n["iterations"] == gpu_check.DRY_SIZES.iterations
        assert n["s_per_iter"] > 0 and n["generation_tokens_per_s"] > 0 and n["train_tokens_per_s"] > 0
        assert n["s_per_iter"] == pytest.approx(n["rollout_s"] + n["train_s"], rel=1e-6)
        assert n["peak_memory_gib"] > 0 and n["policy_loss"] is not None
        assert "mfu" not in n  # no bf16 peak on a CPU
    assert "value_loss" in results["ppo_gae"]["numbers"] and "value_loss" not in results["grpo"]["numbers"]
    # FSDP2 on two CPU ranks makes the one-device step: the same changes of log-probs and values
    fsdp2 = results["step_fsdp2"]["numbers"]
    assert fsdp2["ranks"] == 2 and fsdp2["log_probs_change_max"] > 1e-2
    assert fsdp2["log_probs_relative_diff"] <= gpu_check.STEP_TOLERANCE
    assert fsdp2["values_relative_diff"] <= gpu_check.STEP_TOLERANCE
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(gpu_check.CHECKS)  # the header and a row per check
    assert "| PPO, GAE critic (sdpa) | pass |" in table and "2 ranks" in table


@pytest.mark.slow
def test_a_check_imports_nothing_a_gpu_image_with_torch_transformers_lightning_peft_lacks(dry_run):
    out, _ = dry_run
    ours = ("wandb", "litserve", "datasets", "pandas", "math_verify", "xxhash")  # setup.cfg's, not the image's
    code = (
        "import sys; from lit_rlhf.gpu_check import run_one; "
        f"run_one('grpo', {str(out)!r}, True); "
        f"print(sorted(m for m in {ours!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_failed_check_fails_the_command_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "prepare_kit", lambda out, dry_run: None)
    monkeypatch.setattr(gpu_check, "CHECKS", (gpu_check.Check("grpo", "GRPO (sdpa)"),))
    monkeypatch.setattr(gpu_check, "sizes", lambda dry_run: gpu_check.DRY_SIZES)
    # no kit in this folder: the child process fails, and the report names the exit and the log
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "results.json").read_text())
    (only,) = report["checks"]
    assert only["status"] == "fail" and "exit 1" in only["reason"] and "grpo.log" in only["reason"]
    assert not report["passed"] and "| GRPO (sdpa) | fail |" in (tmp_path / "results.md").read_text()


def test_mfu_and_the_flops_of_a_token_follow_the_model_shape(tmp_path):
    from lit_rlhf.tasks import qwen2_config

    config = qwen2_config()  # Qwen2.5-0.5B's shape
    config.save_pretrained(tmp_path)
    flops, n = gpu_check.model_flops_per_token(str(tmp_path), lora=False)
    h, kv_dim = 896, 2 * 64
    per_layer = h * h * 2 + h * kv_dim * 2 + 3 * h * 4864
    assert n == 24 * per_layer + h * 151936  # 494M: the published 0.49B counts the tied embedding once
    assert 480e6 < n < 500e6
    assert flops == 6 * n and gpu_check.model_flops_per_token(str(tmp_path), lora=True)[0] == 4 * n
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4 and gpu_check.peak_tflops("Some GPU") is None
