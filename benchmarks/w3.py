"""W3: lit_rlhf's GRPO with a calculator tool on the shared W3 workload (multi-turn tool use), through the
real training path.

    python benchmarks/w3.py --assets ~/.cache/w1-bench/w3_assets --out results/lit_rlhf_w3_run1.json

W3 (the shared harness's README and ``w3_common.py``, ``--harness``): 16 prompts x 4 conversations per
iteration; the policy writes a Hermes ``<tool_call>`` turn, the calculator (``w3_tools.calculator``,
20 ms latency, ``--tool-latency-ms``) answers as a ``<tool_response>`` turn, the policy answers; at most
2 tool rounds and 96 completion tokens (tool tokens count), T = 1, no top-k/top-p, nothing suppressed;
reward 1 when the last integer of the final assistant turn without a call equals ``answer``; GRPO
group-normalised advantages, k3 KL 0.05 to the reference in the loss, clip 0.2, one pass of 4 optimizer
steps of 16 conversations (token mean over each mini-batch), AdamW lr 3e-6; fp32, 2 threads,
1 warm-up + 5 timed iterations.

It runs the same PPOModule, RolloutCallback and Lightning Trainer as ``lit-rlhf fit``, with
``rollout.multi_turn: {tools: [calculator], max_turns: 3}`` (turn 1, tool round, turn 2, tool round,
turn 3: exactly W3's 2 tool rounds; a call in the third turn is never run). Nothing in lit_rlhf is
changed or bypassed: the script only wraps the engine's ``generate`` and the toolbox's ``run`` on their
instances to time them and count what they did. Each iteration's useful FLOPs come from the
conversations it sampled, with the workload's own model (``w3_common.w3_flops``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository: lit_rlhf and benchmarks
from benchmarks.common import cpu_trainer, matmul_gflops  # noqa: E402
from benchmarks.w3_timing import W3Timer, check_workload  # noqa: E402
from lit_rlhf import PPOModule, PromptDataModule  # noqa: E402
from lit_rlhf.rewards import RewardFunction  # noqa: E402
from lit_rlhf.rollout.multi_turn.tools import HermesToolParser  # noqa: E402

PARSER = HermesToolParser()


def final_answer(completion: list[dict]) -> str | None:
    """W3's rule: the last integer of the last assistant turn without a (well-formed) tool call."""
    for message in reversed(completion):
        if message.get("role") == "assistant" and not PARSER.parse(message.get("content") or "").calls:
            numbers = re.findall(r"-?\d+", message.get("content") or "")
            return numbers[-1] if numbers else None
    return None


def exact_answer_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the final answer equals ``answer`` (TRL's reward signature: lit_rlhf passes the turns)."""
    return [1.0 if final_answer(c) == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def policy_folder(assets: Path, workdir: Path) -> str:
    """The W3 policy with its tokenizer beside it (lit_rlhf loads the tokenizer from the model folder)."""
    target = workdir / "policy"
    shutil.copytree(assets / "policy", target)
    for f in (assets / "tokenizer").iterdir():
        shutil.copy(f, target / f.name)
    return str(target)


def build_module(policy: str, tool, args) -> PPOModule:
    return PPOModule(
        models={"actor_path": policy, "padding_free": args.padding_free},  # reference = actor_path = the W3 policy
        rewards=[RewardFunction(exact_answer_reward)],
        generation={
            "max_new_tokens": 96,  # the whole completion: model turns and tool turns
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "n_samples_per_prompt": 4,
            "stop_at_eos": True,  # <|im_end|> (the tokenizer's EOS) ends a turn
        },
        rollout={
            "rollout_batch_size": 16,
            "score_micro_batch_size": 64,
            "score_micro_batch_tokens": args.score_tokens,
            "recompute_old_log_probs": args.recompute_old_log_probs,
            "multi_turn": {
                "tools": [tool],
                "max_turns": 3,
                "max_tool_calls": None,  # W3 limits tool rounds (max_turns), not calls
                "template_check": args.template_check,
            },
        },
        algorithm={
            "advantage_estimator": "grpo",  # (s - mean) / (std + eps), unbiased group std: TRL's scale_rewards="group"
            "mini_batch_size": 16,
            "micro_batch_size": 16,
            "micro_batch_tokens": args.micro_tokens,
            "ppo_epochs": 1,
            "clip_eps": 0.2,
        },
        kl={"coef": 0.05, "estimator": "k3", "penalty": "loss"},
        optim={"actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-6, fused=True)}},
        log_samples_every_n_rollouts=0,
    )


def git_commit() -> str:
    """The checkout's commit (``+dirty`` when lit_rlhf/ has uncommitted changes)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "lit_rlhf") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, required=True, help="W3 assets (tokenizer/, policy/, prompts.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="result JSON path")
    parser.add_argument("--harness", type=Path, default=REPO.parent / "shared" / "bench", help="shared bench dir")
    parser.add_argument("--tool-latency-ms", type=float, default=20.0, help="the calculator's sleep per call")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up iterations")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (after the warm-up)")
    parser.add_argument("--template-check", choices=["strict", "warn", "off"], default="warn")
    parser.add_argument("--score-tokens", type=int, default=None, help="rollout.score_micro_batch_tokens")
    parser.add_argument("--micro-tokens", type=int, default=None, help="algorithm.micro_batch_tokens")
    parser.add_argument(
        "--padding-free", action=argparse.BooleanOptionalAction, default=True, help="models.padding_free"
    )
    parser.add_argument(
        "--recompute-old-log-probs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rollout.recompute_old_log_probs (default: the sampler's log-probs, one forward fewer)",
    )
    args = parser.parse_args()
    for need in ("tokenizer", "policy", "prompts.jsonl", "manifest.json"):
        if not (args.assets / need).exists():
            sys.exit(f"W3 assets missing {args.assets / need}: build them with the shared make_w3_assets.py")
    sys.path.insert(0, str(args.harness))
    os.environ["W3_TOOL_LATENCY_MS"] = str(args.tool_latency_ms)
    import w3_common  # the workload's spec, FLOP model and tokenizer helpers
    import w3_tools  # the tool

    w3_tools.LATENCY_S = args.tool_latency_ms / 1000.0
    w3_tools.reset_stats()
    torch.set_num_threads(2)
    L.seed_everything(0, verbose=False)
    manifest = json.loads((args.assets / "manifest.json").read_text())
    epochs = args.warmup + args.iters
    load_before = [round(x, 2) for x in os.getloadavg()]
    matmul_before = matmul_gflops()
    t_fit = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(policy_folder(args.assets, Path(tmp)), w3_tools.calculator, args)
        timer = W3Timer(w3_tools)
        reward_fn = module.rewards[0].fn

        @functools.wraps(reward_fn)  # the same signature: lit_rlhf calls it TRL's way, by keyword
        def timed_reward(*a, **k):
            start = time.perf_counter()
            try:
                return reward_fn(*a, **k)
            finally:
                timer.reward_s += time.perf_counter() - start

        module.rewards[0].fn = timed_reward
        data = PromptDataModule(str(args.assets / "prompts.jsonl"), apply_chat_template=True, max_prompt_len=512)
        trainer = cpu_trainer(epochs, [timer], tmp)
        trainer.fit(module, datamodule=data)
        checks = check_workload(timer.first, module.tokenizer, w3_common)
    fit_wall = time.perf_counter() - t_fit
    matmul_after = matmul_gflops()

    # ---- fail loudly unless the tool really ran, post-tool turns were sampled and every step was taken ----
    if trainer.global_step != 4 * epochs:
        sys.exit(f"FAIL: {trainer.global_step} optimizer steps, W3 takes 4 per iteration ({4 * epochs})")
    if w3_tools.STATS["calls"] == 0 or sum(i["tool_calls"] for i in timer.iters) == 0:
        sys.exit("FAIL: no tool call ran; the W3 workload did not run as specified")
    if not any(len(i["generate_calls"]) > 1 for i in timer.iters):
        sys.exit("FAIL: no turn was sampled after a tool response")

    k0, n_conv = args.warmup, 64
    timed_iters = timer.iters[k0:]
    rate = 0.5 * (matmul_before["median"] + matmul_after["median"])
    useful = [w3_common.w3_flops(i["rows"]) for i in timer.iters]
    ratios = [t / (u["total"] / (rate * 1e9)) for t, u in zip(timer.seconds, useful, strict=True)]
    timed = timer.seconds[k0:]
    median = statistics.median(timed)
    model_tokens = [i["model_tokens"] for i in timer.iters]
    comp_tokens = [i["completion_tokens"] for i in timer.iters]
    tokens_per_iter = round(statistics.mean(model_tokens[k0:]), 1)
    phases = timer.phases[k0:]
    calls_timed = sum(i["tool_calls"] for i in timed_iters)
    result = {
        "benchmark": "lit_rlhf_w3" + ("_recompute" if args.recompute_old_log_probs else ""),
        "workload": "W3",
        "trainer": "lit_rlhf PPOModule(rollout.multi_turn.tools=[calculator], algorithm.advantage_estimator=grpo)",
        "iter_seconds_all": [round(t, 4) for t in timer.seconds],
        "iter_seconds_timed": [round(t, 4) for t in timed],
        "median_s_per_iter": round(median, 4),
        "mean_s_per_iter": round(statistics.mean(timed), 4),
        "generated_tokens_per_iter": tokens_per_iter,  # model-sampled tokens (tool tokens excluded)
        "generated_tokens_per_s": round(tokens_per_iter / median, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "phase_median_s": {k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]},
        "phases_per_iter": [{k: round(v, 4) for k, v in p.items()} for p in timer.phases],
        "matmul_2048_gflops_before": matmul_before,
        "matmul_2048_gflops_after": matmul_after,
        "matmul_gflops_used": round(rate, 1),
        # the machine is shared: cores that other processes kept busy during each iteration (0 = quiet)
        "foreign_cpu_cores_per_iter": [round(x, 2) for x in timer.foreign],
        "loadavg_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "train_wall_s": round(fit_wall, 3),
        "iters": {"warmup": k0, "timed": args.iters},
        "tool_latency_ms": args.tool_latency_ms,
        "tool_calls_per_sample": round(calls_timed / (n_conv * len(timed_iters)), 4),
        "tool_failure_rate": round(sum(i["tool_errors"] for i in timed_iters) / max(1, calls_timed), 4),
        "mean_turns": round(statistics.mean(i["turns_mean"] for i in timed_iters), 3),
        "mean_completion_length": round(statistics.mean(i["completion_len_mean"] for i in timed_iters), 2),
        "mean_model_tokens_per_sample": round(statistics.mean(m / n_conv for m in model_tokens[k0:]), 2),
        "tool_token_fraction": round(1 - sum(model_tokens[k0:]) / max(1, sum(comp_tokens[k0:])), 4),
        "exact_answer_rate": round(statistics.mean(i["exact_answer_rate"] for i in timed_iters), 4),
        "tool_calls_per_iter": [i["tool_calls"] for i in timer.iters],
        "tool_failures_per_iter": [i["tool_errors"] for i in timer.iters],
        "malformed_calls_per_iter": [i["malformed_calls"] for i in timer.iters],
        # conversations whose only "call" was malformed and that got a second turn (TRL ends them after one)
        "turns_after_malformed_call_per_iter": [i["after_malformed_turns"] for i in timer.iters],
        "calculator_invocations_total": w3_tools.STATS["calls"],
        "calculator_failures_total": w3_tools.STATS["failures"],
        "generate_calls_per_iter": [len(i["generate_calls"]) for i in timer.iters],
        "tool_exec_s_per_iter": [i["tool_exec_s_sum"] for i in timer.iters],  # summed over calls (they overlap)
        "tool_wait_s_per_iter": [i["tool_wait_s"] for i in timer.iters],  # wall time with a call running
        "rollout_stats_per_iter": [
            {k: v for k, v in i.items() if k not in ("rows", "generate_calls")} for i in timer.iters
        ],
        "generate_calls": [i["generate_calls"] for i in timer.iters],
        "model_tokens_per_iter": model_tokens,
        "completion_tokens_per_iter": comp_tokens,
        "useful_gflops_per_iter": [round(u["total"] / 1e9, 2) for u in useful],
        "useful_gflops_by_phase_per_iter": [
            {k: round(u[k] / 1e9, 2) for k in ("generation", "scoring", "training")} for u in useful
        ],
        "flops_per_iter": {
            k: statistics.mean(u[k] for u in useful[k0:]) for k in ("generation", "scoring", "training", "total")
        },
        "ratio_to_useful_bound_per_iter": [round(r, 3) for r in ratios],
        "ratio_to_useful_bound": round(statistics.median(ratios[k0:]), 3),
        "checks": checks,
        "manifest_sampling_check": manifest.get("sampling_check", {}),
        "settings": {
            "padding_free": args.padding_free,
            "score_micro_batch_tokens": args.score_tokens,
            "micro_batch_tokens": args.micro_tokens,
            "template_check": args.template_check,
            "recompute_old_log_probs": module.rollout.recomputes_old_log_probs,
            "max_turns": 3,
            "max_tool_calls": None,
        },
        "group_size": 4,
        "beta": 0.05,
        "optimizer_steps_per_iter": 4,
        "optimizer_steps_total": trainer.global_step,  # must be 4 per iteration (nothing skipped)
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": w3_common.versions(),
        "lit_rlhf_commit": git_commit(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    r = result
    print(f"median {median:.3f} s/iter  ({', '.join(f'{t:.3f}' for t in timed)}); all {r['iter_seconds_all']}")
    print(f"phases {r['phase_median_s']}")
    print(
        f"tool calls/sample {r['tool_calls_per_sample']}  failure rate {r['tool_failure_rate']}  "
        f"malformed {r['malformed_calls_per_iter']}  mean turns {r['mean_turns']}  "
        f"mean completion length {r['mean_completion_length']} ({r['mean_model_tokens_per_sample']} sampled)  "
        f"tool-token fraction {r['tool_token_fraction']}  exact answers {r['exact_answer_rate']}"
    )
    print(
        f"generate calls/iter {r['generate_calls_per_iter']}; tool wait s {r['tool_wait_s_per_iter']}; checks {checks}"
    )
    rates = f"{matmul_before['median']}/{matmul_after['median']}"
    print(f"peak RSS {r['peak_rss_mib']:.0f} MiB; matmul {rates} GFLOP/s; {r['cpu_capability']}")
    print(
        f"other processes' CPU cores per iteration {r['foreign_cpu_cores_per_iter']}; load {r['loadavg_before_after']}"
    )
    print(f"useful GFLOP {r['useful_gflops_per_iter']}; to the useful bound {r['ratio_to_useful_bound']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
