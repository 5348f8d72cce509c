"""W1: lit_rlhf's PPO (or GRPO) throughput on the shared W1 workload, through the real training path.

    python benchmarks/w1.py --assets ~/.cache/w1-bench/w1_assets --out results/lit_rlhf_w1_run1.json
    python benchmarks/w1.py --variant grpo --assets ... --out results/lit_rlhf_grpo_w1_run1.json   # W1-GRPO
    python benchmarks/w1.py --response-len 96 --prompts 128 ...      # cost-curve points

Runs the same PPOModule, RolloutCallback and Trainer that `lit-rlhf fit` runs (1 warm-up + 5 timed
iterations; one iteration = one epoch = rollout + PPO updates), and writes a JSON result with the
fields the shared summarize.py reads. Imports nothing from the shared harness: the FLOP model and
the matmul ceiling are computed here.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: lit_rlhf and benchmarks
from benchmarks.common import (  # noqa: E402
    TIMED,
    WARMUP,
    DigitFractionPPO,
    IterationTimer,
    TokenPrompts,
    cpu_trainer,
    matmul_gflops,
    model_folders,
)
from lit_rlhf import PPOModule  # noqa: E402
from lit_rlhf.rewards import RewardModel  # noqa: E402


def flops_per_iteration(config, rows: int, prompt_len: int, response_len: int, critic: bool) -> dict:
    """Matmul FLOPs of one iteration (multiply-add = 2): generation with a KV cache, scoring forwards
    over all tokens (old, reference, and for PPO value and reward), training = 3x forward.

    The old-log-prob forward is counted although lit_rlhf reuses the sampler's log-probs: the bound
    is the workload's, the same for every trainer.
    """
    d, layers, ffn, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    body = layers * (4 * d * d + 3 * d * ffn)  # q, k, v, o + gate, up, down (no GQA in W1)
    total_len = prompt_len + response_len

    def attention(query_positions) -> float:  # QK^T and AV over causal context, per layer
        return rows * layers * 4 * d * sum(p + 1 for p in query_positions)

    generation = 2 * body * rows * (total_len - 1) + 2 * d * vocab * rows * response_len
    generation += attention(range(total_len - 1))
    lm_forward = 2 * (body + d * vocab) * rows * total_len + attention(range(total_len))
    value_forward = 2 * (body + d) * rows * total_len + attention(range(total_len))
    scoring = 2 * lm_forward + (2 * value_forward if critic else 0)  # old + reference (+ value, reward)
    training = 3 * lm_forward + (3 * value_forward if critic else 0)
    return {
        "generation": generation,
        "scoring": scoring,
        "training": training,
        "total": generation + scoring + training,
    }


def build_module(assets: Path, workdir: Path, variant: str, prompts: int, response_len: int) -> PPOModule:
    paths = model_folders(assets, workdir)
    group = 4 if variant == "grpo" else 1
    settings = dict(
        models={"actor_path": paths["policy"]},
        generation={
            "max_new_tokens": response_len,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "suppress_token_ids": (0, 1, 2),
            "n_samples_per_prompt": group,
        },
        rollout={"rollout_batch_size": prompts // group, "score_micro_batch_size": prompts},
        algorithm={
            "advantage_estimator": "grpo" if variant == "grpo" else "gae",
            "mini_batch_size": prompts // 4,
            "micro_batch_size": prompts // 4,
            "ppo_epochs": 1,
            "clip_eps": 0.2,
            "value_clip_eps": 0.2,
            "gamma": 1.0,
            "lam": 0.95,
        },
        optim={
            "actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-6, fused=True)},
            "critic": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-6, fused=True)},
        },
        log_samples_every_n_rollouts=0,
    )
    if variant == "grpo":
        return DigitFractionPPO(**settings, kl={"penalty": "loss", "estimator": "k3", "coef": 0.05})
    rewards = [RewardModel(paths["reward"], micro_batch_size=prompts)]
    return PPOModule(**settings, rewards=rewards, kl={"estimator": "k1", "coef": 0.05})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--assets", type=Path, required=True, help="W1 assets (tokenizer/, policy/, reward/, prompts.jsonl)"
    )
    parser.add_argument("--out", type=Path, required=True, help="result JSON path")
    parser.add_argument("--variant", choices=["ppo", "grpo"], default="ppo")
    parser.add_argument("--prompts", type=int, default=64, help="sequences per rollout (W1: 64)")
    parser.add_argument("--response-len", type=int, default=48, help="sampled tokens per sequence (W1: 48)")
    args = parser.parse_args()
    for need in ("tokenizer", "policy", "reward", "prompts.jsonl"):
        if not (args.assets / need).exists():
            sys.exit(f"W1 assets missing {args.assets / need}: build them with the shared make_w1_assets.py")
    torch.set_num_threads(2)
    L.seed_everything(0, verbose=False)
    matmul_before = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(args.assets, Path(tmp), args.variant, args.prompts, args.response_len)
        timer = IterationTimer()
        trainer = cpu_trainer(WARMUP + TIMED, [timer], tmp)
        trainer.fit(module, datamodule=TokenPrompts(str(args.assets / "prompts.jsonl")))
        config = module.actor.model.config
    matmul_after = matmul_gflops()
    timed, phases = timer.seconds[WARMUP:], timer.phases[WARMUP:]
    median = statistics.median(timed)
    rows = args.prompts
    flops = flops_per_iteration(config, rows, 24, args.response_len, critic=args.variant == "ppo")
    ceiling = 0.5 * (matmul_before["median"] + matmul_after["median"]) * 1e9
    name = f"lit_rlhf_{'grpo_' if args.variant == 'grpo' else ''}w1"
    if (args.prompts, args.response_len) != (64, 48):
        name += f"_p{args.prompts}_r{args.response_len}"
    result = {
        "benchmark": name,
        "iter_seconds_timed": [round(t, 4) for t in timed],
        "median_s_per_iter": round(median, 4),
        "generated_tokens_per_iter": rows * args.response_len,
        "generated_tokens_per_s": round(rows * args.response_len / median, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "phase_median_s": {k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]},
        "matmul_2048_gflops_before": matmul_before,
        "matmul_2048_gflops_after": matmul_after,
        "flops_per_iter": flops,
        "lower_bound_s": round(flops["total"] / ceiling, 4),
        "ratio_to_lower_bound": round(median / (flops["total"] / ceiling), 3),
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"median {median:.3f} s/iter  ({', '.join(f'{t:.3f}' for t in timed)})")
    print(f"phases {result['phase_median_s']}")
    print(
        f"peak RSS {result['peak_rss_mib']:.0f} MiB; "
        f"matmul {matmul_before['median']}/{matmul_after['median']} GFLOP/s; "
        f"ratio to FLOP bound {result['ratio_to_lower_bound']:.2f}x"
    )


if __name__ == "__main__":
    main()
