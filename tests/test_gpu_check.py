"""``python -m lit_rlhf.gpu_check --dry-run``: the GPU check's checks on CPU with a tiny Qwen2, so it cannot rot."""

import json
import os
import subprocess
import sys

import pytest
import torch

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
        "import sys; from lit_rlhf.gpu_check.run import run_one; "
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


def test_each_mode_has_its_own_kit_and_an_interrupted_one_is_built_again(tmp_path):
    assert gpu_check.kit_dir(str(tmp_path), True) != gpu_check.kit_dir(str(tmp_path), False)
    kit = gpu_check.prepare_kit(str(tmp_path), dry_run=True)
    ready = json.loads((tmp_path / "kit-dry-run" / "ready.json").read_text())
    assert kit == gpu_check.kit_dir(str(tmp_path), True) and ready["dry_run"] is True
    weights = sorted(p.name for p in (tmp_path / "kit-dry-run" / "model").iterdir())
    # an interrupted build: no marker, the weights gone; the next run builds the kit again
    (tmp_path / "kit-dry-run" / "ready.json").unlink()
    for p in (tmp_path / "kit-dry-run" / "model").glob("*.safetensors"):
        p.unlink()
    gpu_check.prepare_kit(str(tmp_path), dry_run=True)
    assert sorted(p.name for p in (tmp_path / "kit-dry-run" / "model").iterdir()) == weights


def test_rerunning_some_checks_keeps_the_other_rows_of_the_report(tmp_path):
    def row(name, status, run):
        return {
            "name": name,
            "title": gpu_check.BY_NAME[name].title,
            "status": status,
            "reason": "",
            "numbers": {},
            "seconds": 1.0,
            "run": run,
        }

    machine = {"dry_run": True, "device": "cpu", "gpus": 0, "torch": "x", "cuda": None, "missing_optional": []}
    earlier = [row("ppo_gae", "pass", "first"), row("grpo", "fail", "first"), row("grpo_lora", "pass", "first")]
    gpu_check.write_report(str(tmp_path), {"machine": machine, "checks": earlier, "passed": False})
    rows = gpu_check.merged(str(tmp_path), [row("grpo", "pass", "second")], dry_run=True)
    assert [(r["name"], r["status"], r["run"]) for r in rows] == [
        ("ppo_gae", "pass", "first"),
        ("grpo", "pass", "second"),
        ("grpo_lora", "pass", "first"),
    ]
    # a report of the other mode is not mixed in
    assert [r["name"] for r in gpu_check.merged(str(tmp_path), [row("grpo", "pass", "x")], dry_run=False)] == ["grpo"]


def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys):
    for flags in (["--peak_tflops", "-1"], ["--peak_tflops", "0"], ["--peak_tflops", "inf"]):
        with pytest.raises(SystemExit):
            gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), *flags])
        assert "positive number of TFLOP/s" in capsys.readouterr().err
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out", str(tmp_path / "afile")])
    assert "is a file" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "mine"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main(["--out", str(tmp_path / "out")])
        assert "pass --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
