"""W2: lit_rlhf's PPO on the shared W2 workload (long-tailed response lengths), through the real training path.

    python benchmarks/w2.py --assets ~/.cache/w1-bench/w2_assets --out results/lit_rlhf_w2_run1.json
    python benchmarks/w2.py --engine vllm --assets ... --out results/lit_rlhf_vllm_w2_run1.json

W2 is W1 (models, 64 prompts of 24 tokens, PPO settings: GAE, whitened advantages, k1 KL 0.05 in
the reward, one epoch of 4 shuffled mini-batches of 16, AdamW lr 3e-6) with sampling that stops at
<eos> (ids 0 and 1 suppressed, at most 192 tokens), so response lengths are long-tailed. Each
iteration's useful FLOPs come from the lengths it sampled, with the workload's own FLOP model
(``w2_common.w2_flops`` in the shared harness, ``--harness``): every trainer is charged the same.

How lit_rlhf avoids paying for padding here (same math as the padded path; tests check it):
finished rows leave the decoding batch and its KV cache, scoring forwards take rows of similar
length together, each mini-batch of 16 is cut into micro-batches of similar length under a token
budget (``--micro-tokens``; the loss stays the token mean over the whole mini-batch), and with
``models.padding_free`` (on here; ``--no-padding-free`` turns it off) each forward's rows are
packed into one row, attention kept within each row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository: lit_rlhf and benchmarks
from benchmarks.common import TIMED, WARMUP, IterationTimer, TokenPrompts, cpu_trainer, matmul_gflops, model_folders  # noqa: E402,E501
from lit_rlhf import PPOModule  # noqa: E402
from lit_rlhf.rewards import RewardModel  # noqa: E402
from lit_rlhf.rollout import NativeEngine  # noqa: E402


class CountingEngine(NativeEngine):
    """The native engine, counting the rows still decoding at every decode step of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.live_per_step: list[int] = []
        self.calls = 0

    def generate(self, requests, generation, on_token=None):
        samples = super().generate(requests, generation, on_token)
        lengths = [len(s.token_ids) for s in samples]
        self.calls += 1
        self.live_per_step += [sum(n > step for n in lengths) for step in range(max(lengths, default=0))]
        return samples


def build_module(
    paths: dict[str, str],
    engine,
    score_tokens: int | None,
    micro_tokens: int | None,
    padding_free: bool = True,
    asynchronous: dict | None = None,
) -> PPOModule:
    return PPOModule(
        models={"actor_path": paths["policy"], "padding_free": padding_free},
        rewards=[RewardModel(paths["reward"], micro_batch_size=64, micro_batch_tokens=score_tokens)],
        generation={
            "max_new_tokens": 192,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "stop_at_eos": True,
            "suppress_token_ids": (0, 1),
        },
        rollout={
            "rollout_batch_size": 64,
            "score_micro_batch_size": 64,
            "score_micro_batch_tokens": score_tokens,
            "engine": engine,
            "asynchronous": asynchronous,
        },
        algorithm={
            "advantage_estimator": "gae",
            "mini_batch_size": 16,
            "micro_batch_size": 16,
            "micro_batch_tokens": micro_tokens,
            "ppo_epochs": 1,
            "clip_eps": 0.2,
            "value_clip_eps": 0.2,
            "gamma": 1.0,
            "lam": 0.95,
            "rollout_correction": "decoupled" if asynchronous else "none",
        },
        kl={"estimator": "k1", "coef": 0.05},
        optim={
            "actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-6, fused=True)},
            "critic": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-6, fused=True)},
        },
        log_samples_every_n_rollouts=0,
    )


def vllm_engine():
    from lit_rlhf.rollout import VLLMEngine

    return VLLMEngine(kv_cache_gib=1.0, max_num_seqs=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, required=True, help="W2 assets (tokenizer/, policy/, reward/, ...)")
    parser.add_argument("--out", type=Path, required=True, help="result JSON path")
    parser.add_argument("--engine", choices=["native", "vllm"], default="native")
    parser.add_argument("--harness", type=Path, default=REPO.parent / "shared" / "bench", help="shared bench dir")
    parser.add_argument("--score-tokens", type=int, default=1024, help="rollout.score_micro_batch_tokens")
    parser.add_argument("--micro-tokens", type=int, default=384, help="algorithm.micro_batch_tokens")
    parser.add_argument(
        "--padding-free", action=argparse.BooleanOptionalAction, default=True, help="models.padding_free"
    )
    parser.add_argument(
        "--max-staleness", type=int, default=0, help="rollout.asynchronous.max_staleness (0: synchronous)"
    )
    parser.add_argument("--segment-tokens", type=int, default=16, help="rollout.asynchronous.segment_tokens")
    parser.add_argument("--over-provision", type=int, default=None, help="rollout.asynchronous.over_provision")
    args = parser.parse_args()
    for need in ("tokenizer", "policy", "reward", "prompts.jsonl"):
        if not (args.assets / need).exists():
            sys.exit(f"W2 assets missing {args.assets / need}: build them with the shared make_w2_assets.py")
    sys.path.insert(0, str(args.harness))
    import w2_common  # the workload's FLOP model and length statistics

    torch.set_num_threads(2)
    L.seed_everything(0, verbose=False)
    matmul_before = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        engine = vllm_engine() if args.engine == "vllm" else CountingEngine()
        folders = model_folders(args.assets, Path(tmp))
        asynchronous = None
        if args.max_staleness:
            asynchronous = {
                "max_staleness": args.max_staleness,
                "segment_tokens": args.segment_tokens,
                "over_provision": args.over_provision,
            }
        module = build_module(folders, engine, args.score_tokens, args.micro_tokens, args.padding_free, asynchronous)
        timer = IterationTimer()
        cpu_trainer(WARMUP + TIMED, [timer], tmp).fit(
            module, datamodule=TokenPrompts(str(args.assets / "prompts.jsonl"))
        )
    matmul_after = matmul_gflops()
    rate = 0.5 * (matmul_before["median"] + matmul_after["median"])
    timed, phases, lengths = timer.seconds[WARMUP:], timer.phases[WARMUP:], timer.lengths[WARMUP:]
    useful = [w2_common.w2_flops(x) for x in timer.lengths]
    ratios = w2_common.iteration_ratios(timer.seconds, [f["total"] for f in useful], rate)
    median = statistics.median(timed)
    tokens = [sum(x) for x in lengths]
    name = "lit_rlhf_w2" if args.engine == "native" else "lit_rlhf_vllm_w2"
    if args.max_staleness:
        name += "_async"
    live = getattr(engine, "live_per_step", [])
    result = {
        "benchmark": name,
        "iter_seconds_timed": [round(t, 4) for t in timed],
        "median_s_per_iter": round(median, 4),
        "generated_tokens_per_iter": round(statistics.median(tokens)),
        "generated_tokens_per_s": round(statistics.median(tokens) / median, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # the largest child process (the vLLM engine's worker; 0 with the native engine)
        "children_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "phase_median_s": {k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]},
        "matmul_2048_gflops_before": matmul_before,
        "matmul_2048_gflops_after": matmul_after,
        "response_lengths": w2_common.length_stats([x for row in lengths for x in row]),
        "longest_row_per_iter": [max(x) for x in lengths],
        "useful_gflop_per_iter": [round(f["total"] / 1e9, 1) for f in useful[WARMUP:]],
        "useful_flops_per_iter_median": statistics.median(f["total"] for f in useful[WARMUP:]),
        **ratios,
        # the native engine's decode steps over the whole run (warm-up included) and how many carried < 8 rows
        "decode_steps": len(live),
        "decode_steps_under_8_rows_share": round(sum(n < 8 for n in live) / max(len(live), 1), 3),
        "engine_calls": getattr(engine, "calls", None),
        "settings": {"engine": args.engine, "score_micro_batch_tokens": args.score_tokens},
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }
    result["settings"].update(micro_batch_tokens=args.micro_tokens, padding_free=args.padding_free)
    result["settings"]["asynchronous"] = asynchronous
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"median {median:.3f} s/iter  ({', '.join(f'{t:.3f}' for t in timed)})")
    print(f"phases {result['phase_median_s']}")
    print(f"lengths {result['response_lengths']}  longest {result['longest_row_per_iter']}")
    rates = f"{matmul_before['median']}/{matmul_after['median']}"
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB; matmul {rates} GFLOP/s")
    print(f"decode steps {len(live)}, share with < 8 live rows {result['decode_steps_under_8_rows_share']}")
    print(f"useful GFLOP {result['useful_gflop_per_iter']}; to the useful bound {ratios['ratio_to_useful_bound']:.2f}x")


if __name__ == "__main__":
    main()
