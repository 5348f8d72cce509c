"""One command that proves the GPU path: ``python -m lit_rlhf.gpu_check --out DIR`` (``make gpu-check``).

On a model of Qwen2.5-0.5B-Instruct's shape built from its config (random weights, nothing is
downloaded; a ChatML tokenizer trained on the spot, its ids a part of the 151,936-token vocabulary),
each check runs in a process of its own, so that one failure or out-of-memory leaves the others
standing and Lightning can launch the multi-GPU ones:

- bf16-mixed PPO (GAE critic) and GRPO iterations with sdpa, with gradient checkpointing, with LoRA;
- flash-attention 2 and QLoRA 4-bit, when flash-attn / bitsandbytes are installed;
- the vLLM engine, when vllm is installed: the log-prob probe after every weight push, and its
  ``perf/weight_sync_s``;
- one optimizer step under FSDP1 (``strategy: fsdp``) and FSDP2 (``ModelParallelStrategy``) on the
  machine's GPUs, against the same step on one device.

Each check passes or fails with its numbers: seconds per iteration, generation and training
tokens/s, the training phase's model FLOPs utilisation against the GPU's dense bf16 peak, peak
memory. ``results.json`` and ``results.md`` go to ``--out``, each check's log to ``--out/logs``; the
exit status is 1 when a check failed. ``--dry-run`` runs the same checks on the CPU with a tiny
Qwen2 in fp32 (the GPU-only ones are skipped with their reason), so that the command cannot rot.

It imports only what it exercises: torch, transformers, lightning, peft and jsonargparse (no W&B,
no LitServe), and an optional extra only in the check that needs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name()
BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)
OPTIONAL = {"flash_attn": "flash-attn", "bitsandbytes": "bitsandbytes", "vllm": "vllm"}
STEP_TOLERANCE = 1e-3  # FSDP vs one device: max |Δ log-prob| difference over the largest |Δ log-prob|, fp32
# the engine's sampled log-probs against the trainer's, after a push (mean |difference| per token): the
# same fp32 weights on CPU; on a GPU a bf16 engine against the bf16-mixed trainer
PROBE_TOLERANCE = {"cpu": 1e-4, "cuda": 0.05}
STEP_ROWS = 16  # the fixed experiences of the one-step comparison, split over the ranks


@dataclass(frozen=True)
class Check:
    """One check: ``iterations`` (PPO/GRPO iterations on generated rollouts) or ``step`` (one optimizer
    step on fixed experiences, compared with ``step_single``)."""

    name: str
    title: str
    algorithm: str = "grpo"  # ppo (GAE critic) | grpo
    kind: str = "iterations"
    models: dict = field(default_factory=dict)
    engine: str = "native"  # native | vllm
    strategy: str = "single"  # single | fsdp1 | fsdp2 (kind "step")
    needs: str | None = None  # an optional package (its import name)
    gpu_only: bool = False


LORA = {"rank": 32, "alpha": 32, "target_modules": "all-linear"}
CHECKS = (
    Check("ppo_gae", "PPO, GAE critic (sdpa)", "ppo"),
    Check("grpo", "GRPO (sdpa)"),
    Check("ppo_gae_checkpointing", "PPO, GAE critic, gradient checkpointing", "ppo", {"gradient_checkpointing": True}),
    Check("grpo_lora", "GRPO, LoRA r32 all-linear", models={"lora": LORA}),
    Check(
        "grpo_flash_attention_2",
        "GRPO, flash-attention 2, padding-free",
        models={"attn_implementation": "flash_attention_2", "padding_free": True},
        needs="flash_attn",
        gpu_only=True,
    ),
    Check("grpo_qlora", "GRPO, QLoRA 4-bit NF4", models={"load_in_4bit": True, "lora": LORA}, needs="bitsandbytes"),
    Check("grpo_vllm", "GRPO, vLLM engine (weight push + probe)", engine="vllm", needs="vllm"),
    Check("step_single", "one PPO step, one device (the reference)", "ppo", "step"),
    Check("step_fsdp1", "one PPO step, FSDP1 (strategy: fsdp)", "ppo", "step", strategy="fsdp1", gpu_only=True),
    Check("step_fsdp2", "one PPO step, FSDP2 (ModelParallelStrategy)", "ppo", "step", strategy="fsdp2"),
)
BY_NAME = {check.name: check for check in CHECKS}


@dataclass(frozen=True)
class Sizes:
    """How big the model and the rollouts are: Qwen2.5-0.5B on a GPU, a tiny Qwen2 in the dry run."""

    scale: int
    prompts: int  # per rollout (GRPO: times samples)
    samples: int  # GRPO's group size
    max_new_tokens: int
    mini_batch: int
    micro_batch: int
    iterations: int  # the first one warms up; the numbers are the mean of the rest
    step_prompt_len: int
    step_response_len: int
    timeout_s: int


GPU_SIZES = Sizes(1, 64, 4, 128, 32, 16, 3, 64, 32, 300)
DRY_SIZES = Sizes(16, 4, 2, 8, 4, 2, 2, 12, 6, 300)


def sizes(dry_run: bool) -> Sizes:
    return DRY_SIZES if dry_run else GPU_SIZES


# --- the kit: a model, its tokenizer and prompts, written once -----------------------------------


QUESTION = "Natalia sold clips to {a} of her friends in April, and then she sold {b} clips in May. How many in all?"
INSTRUCTION = "Let's think step by step and output the final answer after '####'."


def varied_reward(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """A score that differs between samples (random weights never get GSM8K right), so that GRPO's
    groups have advantages to train on: the share of the response's characters that are digits."""
    return [sum(ch.isdigit() for ch in r) / max(1, len(r)) for r in responses]


def kit_dir(out: str, dry_run: bool) -> str:
    """The kit of a mode: ``out/kit`` (Qwen2.5-0.5B's shape) or ``out/kit-dry-run`` (tiny), so a GPU run
    into a folder that once held a dry run never measures the tiny model (nor the other way round)."""
    return os.path.join(out, "kit-dry-run" if dry_run else "kit")


def prepare_kit(out: str, dry_run: bool) -> str:
    """The mode's kit: a random-weight Qwen2 (Qwen2.5-0.5B's shape, or tiny), a ChatML tokenizer, prompts.

    Built once: ``ready.json``, written last, marks a whole kit; one without it (an interrupted build)
    is built again."""
    from lit_rlhf.tasks import build_causal_lm, chat_tokenizer, qwen2_config

    kit = kit_dir(out, dry_run)
    if os.path.exists(os.path.join(kit, "ready.json")):
        return kit
    shutil.rmtree(kit, ignore_errors=True)  # a partial kit of this mode, made by this command
    os.makedirs(kit)
    rows = [
        {"prompt": f"{QUESTION.format(a=a, b=b)} {INSTRUCTION}", "answer": str(a + b)}
        for a in range(10, 60)
        for b in range(1, 9)
    ]
    with open(os.path.join(kit, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    corpus = [row["prompt"] for row in rows] * 2
    tokenizer = chat_tokenizer("chatml", corpus, vocab_size=2000 if not dry_run else 400, split_digits=True)
    if dry_run:  # head size 64 (vLLM's CPU attention has no smaller one)
        config = qwen2_config(tokenizer, scale=16, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    else:  # the real vocabulary; the tokenizer's ids are its first entries
        config = qwen2_config(
            None,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    build_causal_lm(config).save_pretrained(os.path.join(kit, "model"))
    tokenizer.save_pretrained(os.path.join(kit, "model"))
    with open(os.path.join(kit, "ready.json"), "w") as f:
        json.dump({"dry_run": dry_run, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size}, f)
    return kit


def model_flops_per_token(path: str, lora: bool) -> tuple[float, int]:
    """Training FLOPs per token of the actor (forward + backward: 6 N, or 4 N through a LoRA adapter,
    where no base weight gets a gradient; N counts every matmul weight, the output layer's included,
    the embedding lookup not) and N itself."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    n = layers * (attention + 3 * h * inter) + h * config.vocab_size
    return (4.0 if lora else 6.0) * n, n


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# --- the parent: which checks run, in their processes; the report --------------------------------


def compare_steps(out: str, name: str, ranks: int) -> dict:
    """``name``'s step against ``step_single``'s: how far apart the log-prob and value changes are."""
    import torch

    def load(check: str, count: int) -> dict:
        paths = [os.path.join(out, "steps", f"{check}.rank{r}.pt") for r in range(count)]
        parts = [torch.load(path, weights_only=True) for path in paths]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    single, sharded = load("step_single", 1), load(name, ranks)
    numbers: dict[str, float] = {"tolerance": STEP_TOLERANCE}
    for what in ("log_probs", "values"):
        change = single[f"{what}_after"] - single[f"{what}_before"]
        other = sharded[f"{what}_after"] - sharded[f"{what}_before"]
        numbers[f"{what}_change_max"] = float(change.abs().max())
        numbers[f"{what}_relative_diff"] = float((change - other).abs().max() / change.abs().max().clamp_min(1e-12))
    worst = max(numbers["log_probs_relative_diff"], numbers["values_relative_diff"])
    moved = numbers["log_probs_change_max"] > 1e-4
    reason = (
        ""
        if moved and worst <= STEP_TOLERANCE
        else (
            "the step did not change the log-probs"
            if not moved
            else f"relative difference {worst:.2e} > {STEP_TOLERANCE}"
        )
    )
    return {"status": "pass" if not reason else "fail", "reason": reason, "numbers": numbers}


def skip_reason(check: Check, dry_run: bool, cuda: bool) -> str | None:
    if check.gpu_only and (dry_run or not cuda):
        return "needs a GPU" + (" (dry run)" if dry_run else "")
    if check.needs is not None and importlib.util.find_spec(check.needs) is None:
        return f"{check.needs} is not installed (pip install {OPTIONAL[check.needs]})"
    if check.needs == "bitsandbytes" and (dry_run or not cuda):
        return "QLoRA 4-bit needs a GPU" + (" (dry run)" if dry_run else "")
    return None


def machine(dry_run: bool) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "missing_optional": [pip for module, pip in OPTIONAL.items() if importlib.util.find_spec(module) is None],
    }
    for package in ("transformers", "lightning", "peft", "flash_attn", "bitsandbytes", "vllm"):
        if importlib.util.find_spec(package) is not None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                info[package] = version({"flash_attn": "flash-attn"}.get(package, package))
            except PackageNotFoundError:
                info[package] = "?"
    info["bf16_peak_tflops"] = peak_tflops(info["device"]) if cuda else None
    return info


def run_checks(out: str, dry_run: bool, only: list[str] | None = None, peak: float | None = None) -> dict:
    """Run every check (or ``only`` these) in its own process; write results.json and results.md."""
    info = machine(dry_run)
    cuda = info["gpus"] > 0
    peak = peak or info["bf16_peak_tflops"]
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    kit_start = time.perf_counter()
    prepare_kit(out, dry_run)
    info["kit_s"] = time.perf_counter() - kit_start
    if only and any(BY_NAME[name].kind == "step" for name in only):
        only = [*only, "step_single"]  # the reference of the FSDP steps
    results = []
    for check in CHECKS:
        if only and check.name not in only:
            continue
        row = {"name": check.name, "title": check.title}
        reason = skip_reason(check, dry_run, cuda)
        if reason is not None:
            results.append({**row, "status": "skip", "reason": reason, "numbers": {}, "seconds": 0.0})
            print(f"[gpu-check] {check.name}: skip ({reason})", flush=True)
            continue
        result_file = os.path.join(out, "checks", f"{check.name}.json")
        if os.path.exists(result_file):
            os.remove(result_file)
        command = [sys.executable, "-m", "lit_rlhf.gpu_check", "--run-one", check.name, "--out", out]
        command += ["--dry-run"] if dry_run else []
        start = time.perf_counter()
        print(f"[gpu-check] {check.name}: {check.title} ...", flush=True)
        log_path = os.path.join(out, "logs", f"{check.name}.log")
        with open(log_path, "w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=sizes(dry_run).timeout_s)
                returncode = code.returncode
            except subprocess.TimeoutExpired:
                returncode = None
        seconds = time.perf_counter() - start
        if returncode == 0 and os.path.exists(result_file):
            with open(result_file) as f:
                result = json.load(f)
        else:
            with open(log_path) as f:
                tail = f.read().strip().splitlines()[-1:] or [""]
            why = f"timed out after {sizes(dry_run).timeout_s} s" if returncode is None else f"exit {returncode}"
            result = {"status": "fail", "reason": f"{why}: {tail[0][-300:]} (log: {log_path})", "numbers": {}}
        if result["status"] == "pass" and check.kind == "step" and check.name != "step_single":
            single = next((r for r in results if r["name"] == "step_single"), None)
            if single is None or single["status"] != "pass":
                result = {"status": "fail", "reason": "no single-device step to compare with", "numbers": {}}
            else:
                numbers = result["numbers"]
                result = compare_steps(out, check.name, int(numbers["ranks"]))
                result["numbers"].update(numbers)
        numbers = result["numbers"]
        if peak and "train_tokens_per_s" in numbers:
            flops = numbers["train_flops_per_token"] * numbers["train_tokens_per_s"]
            numbers["mfu"] = flops / (peak * 1e12)
        results.append({**row, **result, "seconds": seconds})
        print(f"[gpu-check] {check.name}: {result['status']} in {seconds:.0f} s {result['reason']}", flush=True)
    passed = all(r["status"] != "fail" for r in results)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    results = [{**r, "run": stamp} for r in results]
    report = {"machine": info, "checks": merged(out, results, dry_run), "passed": passed}
    write_report(out, report)
    return report


def merged(out: str, results: list[dict], dry_run: bool) -> list[dict]:
    """This run's rows, and the rows of an earlier run into ``out`` (the same mode) for the checks this
    one did not run, in the checks' order: rerunning one check keeps the rest of the table."""
    path = os.path.join(out, "results.json")
    earlier: list[dict] = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
            if previous["machine"]["dry_run"] == dry_run:
                earlier = previous["checks"]
        except (OSError, ValueError, KeyError, TypeError):
            earlier = []  # not a report of this command: replaced
    ran = {r["name"] for r in results}
    rows = {r["name"]: r for r in earlier if r.get("name") in BY_NAME and r["name"] not in ran}
    rows.update({r["name"]: r for r in results})
    return [rows[check.name] for check in CHECKS if check.name in rows]


def write_report(out: str, report: dict) -> None:
    """results.json and results.md, replaced together (a temporary file of each renamed over it)."""
    from lit_rlhf.textfiles import write_files

    json_path, md_path = os.path.join(out, "results.json"), os.path.join(out, "results.md")
    write_files({json_path: json.dumps(report, indent=1), md_path: markdown(report)})


def _fmt(value: Any, digits: int = 0, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return f"{value * scale:,.{digits}f}"


def markdown(report: dict) -> str:
    """The results as a Markdown table (what the README shows)."""
    info = report["machine"]
    lines = [
        f"`python -m lit_rlhf.gpu_check{' --dry-run' if info['dry_run'] else ''}` on {info['device']}"
        f" × {max(info['gpus'], 1)}, torch {info['torch']}"
        + (f" (CUDA {info['cuda']})" if info["cuda"] else "")
        + (f"; missing optional: {', '.join(info['missing_optional'])}" if info["missing_optional"] else ""),
        "",
        "| check | result | s/iter | gen tok/s | train tok/s | MFU | peak GiB | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["checks"]:
        n = r["numbers"]
        notes = r["reason"]
        if "weight_sync_s" in n:
            notes = f"weight_sync_s {n['weight_sync_s']:.3f}, probe diff {n.get('weight_check_logprob_diff', 0):.2e}"
        if "log_probs_relative_diff" in n:
            notes = (
                f"{n['ranks']:.0f} ranks; Δlog-prob rel. diff {n['log_probs_relative_diff']:.1e}, "
                f"Δvalue {n['values_relative_diff']:.1e} (tolerance {n['tolerance']:.0e})"
            )
        if "policy_loss" in n and not notes:
            notes = f"reward {n['reward_mean']:.3f}, policy loss {n['policy_loss']:.3f}"
            notes += f", value loss {n['value_loss']:.3f}" if "value_loss" in n else ""
        if r["status"] == "fail" and r["reason"]:
            notes = r["reason"]
        lines.append(
            f"| {r['title']} | {r['status']} | {_fmt(n.get('s_per_iter'), 2)} | "
            f"{_fmt(n.get('generation_tokens_per_s'))} | {_fmt(n.get('train_tokens_per_s'))} | "
            f"{_fmt(n.get('mfu'), 1, 100.0)}{'%' if n.get('mfu') is not None else ''} | "
            f"{_fmt(n.get('peak_memory_gib'), 2)} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of TFLOP/s, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, logs/ and the kit")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on CPU with a tiny Qwen2 in fp32")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run these checks only")
    parser.add_argument(
        "--peak_tflops", type=positive_float, help="the GPU's dense bf16 peak (TFLOP/s), if it is not in the table"
    )
    parser.add_argument("--run-one", choices=list(BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.run_one:
        from lit_rlhf.gpu_check.run import run_one

        run_one(args.run_one, args.out, args.dry_run)
        return 0
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a file: pass a folder (it is made if missing)")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: the checks are sized for a GPU; pass --dry-run to run them on CPU")
    report = run_checks(args.out, args.dry_run, args.only, args.peak_tflops)
    print(markdown(report))
    print(f"[gpu-check] results: {os.path.join(args.out, 'results.json')} and results.md")
    return 0 if report["passed"] else 1
