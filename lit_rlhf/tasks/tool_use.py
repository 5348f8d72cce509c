"""The embedded tool-use task: 3-digit x 2-digit products, which the tiny policy cannot work out in its
head, and a ``calculator`` tool, which can.

A prompt is ``What is 347*58?``; the answer is the product (``20126``). The SFT data (conversations in
the Qwen2.5 tool format) answers a ``tool_fraction`` (half) of the problems by calling the calculator
(``<tool_call>{"name": "calculator", "arguments": {"expression": "347*58"}}</tool_call>``, the tool's
response, then the number) and the rest by writing a number straight away, so the SFT policy calls the
tool only sometimes and guesses otherwise. RL with the exact-answer reward then has something to find:
call the tool, and copy its answer.

python -m lit_rlhf.tasks.tool_use prepare --out assets/demo/tools
python -m lit_rlhf.tasks.tool_use report --assets assets/demo/tools --run runs/grpo_tools_tiny
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import operator
import os
import random
import re

import torch
from torch import Tensor

from lit_rlhf.tasks.arithmetic import write_jsonl

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_NUMBER = re.compile(r"-?\d+")
TOOL_CALL = "<tool_call>"


def calculator(expression: str) -> str:
    """Evaluate an integer expression (+ - * // % and parentheses).

    Args:
        expression: e.g. 347*58
    """
    if len(expression) > 64:
        raise ValueError(f"the expression is {len(expression)} characters long; at most 64 are read")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from err

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return value(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
                raise ValueError("division by zero")
            result = _OPERATORS[type(node.op)](left, right)
            if abs(result) > 10**18:
                raise ValueError("the result is too large")
            return result
        raise ValueError(f"only integers, + - * // % and parentheses are allowed: {expression!r}")

    return str(value(tree.body))


def problems(seed: int = 0) -> list[tuple[int, int]]:
    """Every (a, b) with a in 100..999 and b in 10..99 (72,900 products), shuffled with ``seed``."""
    pairs = [(a, b) for a in range(100, 1000) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs


def question(a: int, b: int) -> str:
    return f"What is {a}*{b}?"


def prompt_records(pairs: list[tuple[int, int]]) -> list[dict]:
    """Prompt-file records: the question and its ``answer`` column (the product, as text)."""
    return [{"prompt": question(a, b), "answer": str(a * b)} for a, b in pairs]


def call_text(expression: str) -> str:
    """The assistant's calculator call, as the policy writes it (Hermes/Qwen2.5 format)."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"{TOOL_CALL}{json.dumps(call)}</tool_call>"


def guess(a: int, b: int, rng: random.Random) -> str:
    """A number of the product's size, as a tiny model would guess it: the right leading digit and the
    right last digit (both learnable by pattern), random digits between."""
    right = str(a * b)
    middle = "".join(rng.choice("0123456789") for _ in range(len(right) - 2))
    return right[0] + middle + right[-1]


def conversation(a: int, b: int, use_tool: bool, rng: random.Random) -> list[dict]:
    """One SFT conversation: the question, then either a calculator call, its result and the answer, or
    a guessed number straight away."""
    messages = [{"role": "user", "content": question(a, b)}]
    if use_tool:
        result = calculator(f"{a}*{b}")
        messages += [
            {"role": "assistant", "content": call_text(f"{a}*{b}")},
            {"role": "tool", "name": "calculator", "content": result},
            {"role": "assistant", "content": result},
        ]
    else:
        messages.append({"role": "assistant", "content": guess(a, b, rng)})
    return messages


def sft_records(pairs: list[tuple[int, int]], n: int, tool_fraction: float, seed: int) -> list[dict]:
    """``n`` SFT conversations with the ``tools`` column; ``tool_fraction`` of them call the calculator."""
    from lit_rlhf.rollout.multi_turn.tools import tool_schema

    rng, tools = random.Random(seed), [tool_schema(calculator)]
    records = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        records.append({"messages": conversation(a, b, rng.random() < tool_fraction, rng), "tools": tools})
    return records


def last_number(text: str) -> str | None:
    """The last integer in ``text`` (None: none)."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def answer_reward(prompts: list[str], responses: list[str], answer: list) -> Tensor:
    """1.0 where the final assistant turn ends on the right number and calls no tool, else 0.0."""
    return torch.tensor(
        [float(TOOL_CALL not in r and last_number(r) == str(a).strip()) for r, a in zip(responses, answer, strict=True)]
    )


def tool_call_rate(prompts: list[str], responses: list[str], completions: list) -> Tensor:
    """1.0 where the conversation called a tool (any assistant turn with a ``<tool_call>``), else 0.0."""
    return torch.tensor([float(any(called(m) for m in c)) if isinstance(c, list) else 0.0 for c in completions])


def called(message: dict) -> bool:
    return message.get("role") == "assistant" and TOOL_CALL in str(message.get("content", ""))


def corpus(records: list[dict]) -> list[str]:
    """Texts for the tokenizer: conversations rendered by the chat template (so the system turn and the
    call's frame become few tokens), and every digit."""
    from lit_rlhf.tasks.tiny import chat_tokenizer

    renderer = chat_tokenizer("qwen_tools", ["0123456789"], vocab_size=300)  # renders text; its vocabulary is unused
    texts = [renderer.apply_chat_template(r["messages"], tools=r["tools"], tokenize=False) for r in records]
    return [*texts, "0123456789"]


def prepare(
    out: str,
    sft_size: int = 10_240,
    tool_fraction: float = 0.5,
    rl_prompts: int = 4096,
    test_prompts: int = 256,
    seed: int = 0,
) -> None:
    """The task's tokenizer (ChatML with tools, one token per digit), a randomly initialised tiny Llama
    (``base/``), the SFT conversations and the RL and held-out prompt files (disjoint problems)."""
    from lit_rlhf.tasks.tiny import build_causal_lm, chat_tokenizer, tiny_llama_config

    pairs = problems(seed)
    test, rl, train = pairs[:test_prompts], pairs[test_prompts : test_prompts + rl_prompts], pairs[test_prompts:]
    sft = sft_records(train, sft_size, tool_fraction, seed)
    sft_val = sft_records(test[:128], 128, tool_fraction, seed + 1)
    tokenizer = chat_tokenizer("qwen_tools", corpus(sft[:2000]), 1024, split_digits=True, merge_within="lines")
    config = tiny_llama_config(tokenizer, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=512)
    build_causal_lm(config, seed).save_pretrained(f"{out}/base")
    tokenizer.save_pretrained(f"{out}/base")
    write_jsonl(f"{out}/sft.jsonl", sft)
    write_jsonl(f"{out}/sft_val.jsonl", sft_val)
    write_jsonl(f"{out}/prompts.jsonl", prompt_records(rl))
    write_jsonl(f"{out}/test_prompts.jsonl", prompt_records(test))


def held_out(metrics_csv: str) -> list[dict]:
    """Each validation's held-out ``accuracy`` and ``tool_call_rate`` (the first one is the SFT
    policy's: the config validates before training), with its epoch."""
    import pandas as pd

    frame = pd.read_csv(metrics_csv).dropna(subset=["val/accuracy"])
    return [
        {
            "epoch": int(r["epoch"]),
            "accuracy": float(r["val/accuracy"]),
            "tool_call_rate": float(r["val/tool_call_rate"]),
        }
        for _, r in frame.iterrows()
    ]


def plot(metrics_csv: str, out_png: str) -> None:
    """Held-out accuracy and tool-call rate per validation, and the rollouts' mean reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(metrics_csv)
    reward = frame.dropna(subset=["reward/mean"]).groupby("epoch")["reward/mean"].mean()
    points = held_out(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(reward.index + 1, reward.values, color="tab:blue", alpha=0.6, label="rollout reward (mean)")
    epochs = [0] + [p["epoch"] + 1 for p in points[1:]]  # the first validation ran before any update
    ax.plot(epochs, [p["accuracy"] for p in points], "o-", color="tab:green", label="held-out accuracy")
    ax.plot(epochs, [p["tool_call_rate"] for p in points], "s--", color="tab:orange", label="held-out tool-call rate")
    ax.set_xlabel("GRPO rollouts (one per epoch)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.suptitle("lit_rlhf embedded tool-use task: GRPO with a calculator tool")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def report(assets: str, run: str) -> dict:
    """The before/after table on the held-out prompts (from the run's validations), the stage
    timings, and ``demo_tools.png`` in the run directory."""
    from lit_rlhf.plot import newest_run
    from lit_rlhf.tasks.machine import describe_machine, stage_seconds

    run = newest_run(run)
    csvs = sorted(glob.glob(f"{run}/**/metrics.csv", recursive=True), key=os.path.getmtime)
    if not csvs:
        raise FileNotFoundError(f"no metrics.csv under {run}: run configs/grpo_tools_tiny.yaml first")
    points = held_out(csvs[-1])
    if len(points) < 2:
        raise ValueError(
            f"{csvs[-1]} holds {len(points)} validation(s); the report needs the one before training and one after"
        )
    before, after = points[0], points[-1]
    timings = stage_seconds(assets, ("prepare", "sft", "grpo"))
    with open(f"{assets}/test_prompts.jsonl") as f:
        n = sum(1 for _ in f)
    print(f"\nHeld-out test prompts: {n}, sampled at T = 1, with the calculator")
    print(f"{'':14} {'accuracy':>9} {'tool calls':>11}")
    for name, row in (("SFT policy", before), ("GRPO policy", after)):
        print(f"{name:14} {row['accuracy']:9.3f} {row['tool_call_rate']:11.3f}")
    gain = after["accuracy"] - before["accuracy"]
    print(f"accuracy gain: {100 * gain:+.1f} points")
    machine = describe_machine()
    if timings:
        print(
            "stage seconds: "
            + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
            + f" (total {sum(timings.values()):.0f})"
        )
    print(
        f"machine: {machine['cpu_capability']}, fp32, fp32 matmul {machine['fp32_matmul_gflops']:.0f} GFLOP/s "
        f"on {machine['threads']} threads"
    )
    plot(csvs[-1], f"{run}/demo_tools.png")
    print(f"plot: {run}/demo_tools.png")
    summary = {
        "before": before,
        "after": after,
        "validations": points,
        "gain_points": 100 * gain,
        "seconds": timings,
        "machine": machine,
        "run": run,
        "plot": f"{run}/demo_tools.png",
    }
    with open(f"{run}/demo_tools_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenizer, base model and data files")
    prep.add_argument("--out", default="assets/demo/tools")
    rep = sub.add_parser("report", help="before/after table and plot")
    rep.add_argument("--assets", default="assets/demo/tools")
    rep.add_argument("--run", default="runs/grpo_tools_tiny", help="a GRPO run, or its config's root (the newest run)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    else:
        report(args.assets, args.run)


if __name__ == "__main__":
    main()
