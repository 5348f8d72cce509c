"""The embedded RLHF pipeline's data and report: ``prepare`` before SFT, ``report`` after PPO (and DPO).

python -m lit_rlhf.tasks.demo prepare --out assets/demo
python -m lit_rlhf.tasks.demo report --assets assets/demo --run runs/ppo_tiny   (its newest run)
python -m lit_rlhf.tasks.demo report --assets assets/demo --run runs/ppo_tiny --dpo_run runs/dpo_tiny
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch

from lit_rlhf.tasks.arithmetic import (
    corpus,
    exact_match_reward,
    preference_records,
    prompt_records,
    sft_records,
    solve,
    split_problems,
    write_jsonl,
)
from lit_rlhf.tasks.machine import describe_machine, stage_seconds
from lit_rlhf.tasks.tiny import build_causal_lm, tiny_llama_config, train_tokenizer


def prepare(out: str, sft_size: int = 40_000, wrong_fraction: float = 0.3, pairs: int = 40_000, seed: int = 0) -> None:
    """Tokenizer, a randomly initialised tiny Llama (``base/``) and every data split as JSONL."""
    splits = split_problems(seed)
    tokenizer = train_tokenizer(corpus(), kind="char")
    config = tiny_llama_config(tokenizer, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=512)
    model = build_causal_lm(config, seed)
    model.save_pretrained(f"{out}/base")
    tokenizer.save_pretrained(f"{out}/base")
    train = splits["train"]
    write_jsonl(f"{out}/sft.jsonl", sft_records(train, sft_size, wrong_fraction, seed))
    write_jsonl(f"{out}/sft_val.jsonl", sft_records(splits["dev"], 512, 0.0, seed + 1))
    write_jsonl(f"{out}/pairs.jsonl", preference_records(train, pairs, seed + 2))
    write_jsonl(f"{out}/pairs_val.jsonl", preference_records(splits["dev"], 1000, seed + 3))
    write_jsonl(f"{out}/prompts.jsonl", prompt_records(splits["ppo"]))
    write_jsonl(f"{out}/val_prompts.jsonl", prompt_records(splits["dev"][:256]))
    write_jsonl(f"{out}/test_prompts.jsonl", prompt_records(splits["test"]))


@torch.no_grad()
def evaluate(
    policy_path: str, reference_path: str, reward_path: str, prompts: list[str], temperature: float = 1.0, seed: int = 0
) -> dict[str, float]:
    """Held-out accuracy (sampled at ``temperature``), mean reward-model score, KL to the reference."""
    from lit_rlhf.models import Actor, GenerationSettings, ValueModel, load_tokenizer, response_texts

    tok = load_tokenizer(policy_path)
    policy, reference = (
        Actor.from_pretrained(policy_path, tok).eval(),
        Actor.from_pretrained(reference_path, tok).eval(),
    )
    reward = ValueModel.from_pretrained(reward_path).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    settings = GenerationSettings(max_new_tokens=4, temperature=temperature)
    gen = policy.generate(enc.input_ids, enc.attention_mask, settings, torch.Generator().manual_seed(seed))
    num_actions = gen.loss_mask.shape[1]
    kl = policy(gen.sequences, gen.attention_mask, num_actions, settings.scoring_temperature) - reference(
        gen.sequences, gen.attention_mask, num_actions, settings.scoring_temperature
    )
    responses = response_texts(tok, gen.sequences, gen.attention_mask, num_actions)
    return {
        "accuracy": exact_match_reward(prompts, responses, [solve(p) for p in prompts]).mean().item(),
        "reward_model_score": reward.score(gen.sequences, gen.attention_mask).mean().item(),
        "kl_to_reference": (kl * gen.loss_mask).sum(-1).mean().item(),
    }


def plot(metrics_csv: str, out_png: str, sft_accuracy: float | None = None) -> None:
    """Reward per rollout and held-out accuracy per validation, from the PPO run's CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(metrics_csv)
    reward = frame.dropna(subset=["reward/mean"]).groupby("epoch")["reward/mean"].mean()
    accuracy = frame.dropna(subset=["val/accuracy"]).groupby("epoch")["val/accuracy"].mean()
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(reward.index, reward.values, color="tab:blue", label="reward-model score (rollout mean)")
    left.set_xlabel("PPO epoch (one rollout each)")
    left.set_ylabel("reward-model score", color="tab:blue")
    right = left.twinx()
    right.plot(accuracy.index, accuracy.values, "o-", color="tab:green", label="held-out accuracy (T = 1)")
    if sft_accuracy is not None:
        right.axhline(sft_accuracy, color="tab:gray", linestyle="--", label="SFT policy (test prompts)")
    right.set_ylabel("held-out exact-match accuracy", color="tab:green")
    right.legend(loc="lower right")
    right.set_ylim(0, 1)
    fig.suptitle("lit_rlhf embedded demo: PPO on noisy-SFT arithmetic")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def report(assets: str, run: str, export_dir: str | None = None, dpo_run: str | None = None) -> dict:
    """Before/after table on the test prompts, stage timings, and ``demo.png`` in the run directory.

    ``run`` is a PPO run directory, or its config's root (``runs/ppo_tiny``: the newest run);
    ``export_dir`` defaults to the run's ``export/``. ``dpo_run`` (a DPO run or its config's root)
    adds the DPO policy, trained from the same SFT policy on the reward model's pairs, as a row.
    """
    from lit_rlhf.plot import newest_run

    run = newest_run(run)
    export_dir = export_dir or f"{run}/export"
    with open(f"{assets}/test_prompts.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    sft, rm = f"{assets}/sft", f"{assets}/rm"
    rows = {
        "SFT policy": evaluate(sft, sft, rm, prompts),
        "PPO policy": evaluate(f"{export_dir}/actor", sft, rm, prompts),
    }
    if dpo_run is not None:
        dpo_run = newest_run(dpo_run)
        rows["DPO policy"] = evaluate(f"{dpo_run}/export", sft, rm, prompts)
    timings = stage_seconds(assets, ("sft", "rm", "ppo", "dpo"))
    print(f"\nHeld-out test prompts: {len(prompts)}, sampled at T = 1")
    print(f"{'':12} {'accuracy':>9} {'RM score':>9} {'KL to SFT':>10}")
    for name, row in rows.items():
        print(f"{name:12} {row['accuracy']:9.3f} {row['reward_model_score']:9.3f} {row['kl_to_reference']:10.3f}")
    gain = rows["PPO policy"]["accuracy"] - rows["SFT policy"]["accuracy"]
    print(f"accuracy gain: {100 * gain:+.1f} points")
    if "DPO policy" in rows:
        dpo_gain = rows["DPO policy"]["accuracy"] - rows["SFT policy"]["accuracy"]
        print(f"DPO accuracy gain: {100 * dpo_gain:+.1f} points")
    machine = describe_machine()
    if timings:
        print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(
        f"machine: {machine['cpu_capability']}, bf16 {'native' if machine['native_bf16'] else 'emulated (fp32 used)'}, "
        f"fp32 matmul {machine['fp32_matmul_gflops']:.0f} GFLOP/s on {machine['threads']} threads"
    )
    csvs = sorted(glob.glob(f"{run}/**/metrics.csv", recursive=True), key=os.path.getmtime)
    summary = {"before": rows["SFT policy"], "after": rows["PPO policy"], "gain_points": 100 * gain, "seconds": timings}
    summary["machine"] = machine
    summary["run"] = run
    if "DPO policy" in rows:
        summary.update(dpo=rows["DPO policy"], dpo_gain_points=100 * dpo_gain, dpo_run=dpo_run)
    if csvs:
        plot(csvs[-1], f"{run}/demo.png", rows["SFT policy"]["accuracy"])
        summary["plot"] = f"{run}/demo.png"
        print(f"plot: {run}/demo.png")
    with open(f"{run}/demo_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenizer, base model and data splits")
    prep.add_argument("--out", default="assets/demo")
    rep = sub.add_parser("report", help="before/after table and plot")
    rep.add_argument("--assets", default="assets/demo")
    rep.add_argument("--run", default="runs/ppo_tiny", help="a PPO run, or its config's root (the newest run)")
    rep.add_argument("--export_dir", default=None, help="the exported policy (default: the run's export/)")
    rep.add_argument("--dpo_run", default=None, help="a DPO run, or its config's root: adds its policy as a row")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    else:
        report(args.assets, args.run, args.export_dir, args.dpo_run)


if __name__ == "__main__":
    main()
