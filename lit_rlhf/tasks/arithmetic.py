"""The embedded task: two-digit addition and subtraction, with a verifiable answer.

Prompts look like ``07+45=`` or ``83-26=`` (a >= b for subtraction, so answers are 0..198); the
correct response is the decimal answer followed by EOS. Every prompt has the same length, so a
batch needs no padding.
"""

from __future__ import annotations

import json
import os
import random

import torch
from torch import Tensor

from lit_rlhf.textfiles import write_files

OPERATORS = ("+", "-")


def all_problems() -> list[str]:
    """Every prompt of the task, in a fixed order (10,000 sums and 5,050 differences)."""
    sums = [f"{a:02d}+{b:02d}=" for a in range(100) for b in range(100)]
    differences = [f"{a:02d}-{b:02d}=" for a in range(100) for b in range(a + 1)]
    return sums + differences


def solve(prompt: str) -> str:
    """The correct response to ``prompt`` (``"07+45="`` -> ``"52"``)."""
    a, op, b = int(prompt[:2]), prompt[2], int(prompt[3:5])
    return str(a + b if op == "+" else a - b)


def exact_match_reward(prompts: list[str], responses: list[str], answer: list) -> Tensor:
    """1.0 where the response is exactly the row's ``answer`` column, else 0.0 (a verifiable reward)."""
    return torch.tensor([float(r.strip() == str(a).strip()) for r, a in zip(responses, answer, strict=True)])


def prompt_records(prompts: list[str]) -> list[dict]:
    """Prompt-file records: the prompt and its ``answer`` (the column the verifiable reward reads)."""
    return [{"prompt": p, "answer": solve(p)} for p in prompts]


def wrong_answer(prompt: str, rng: random.Random, kinds: tuple[str, ...] = ("offset", "digit")) -> str:
    """A plausible wrong answer: off by 1..5, or one digit replaced, dropped or inserted."""
    right = solve(prompt)
    while True:
        kind = rng.choice(kinds)
        if kind == "offset":
            candidate = str(int(right) + rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5]))
        else:
            digits, i = list(right), rng.randrange(len(right))
            edit = rng.choice(["replace", "drop", "insert"])
            if edit == "replace":
                digits[i] = rng.choice("0123456789")
            elif edit == "drop" and len(digits) > 1:
                del digits[i]
            else:
                digits.insert(i, rng.choice("0123456789"))
            candidate = "".join(digits)
        if candidate != right and not candidate.startswith("-") and (candidate == "0" or not candidate.startswith("0")):
            return candidate


def sft_records(prompts: list[str], n: int, wrong_fraction: float, seed: int) -> list[dict]:
    """``n`` demonstrations; a ``wrong_fraction`` of them answer off by 1..5 (a noisy SFT set)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        noisy = rng.random() < wrong_fraction
        records.append(
            {"prompt": prompt, "response": wrong_answer(prompt, rng, ("offset",)) if noisy else solve(prompt)}
        )
    return records


def preference_records(prompts: list[str], n: int, seed: int) -> list[dict]:
    """``n`` (prompt, chosen = right answer, rejected = wrong answer) pairs, wrong answers of every kind.

    Each record also carries the ``answer`` column, which the held-out metric
    (:func:`exact_match_reward`) reads when DPO samples on the validation pairs' prompts.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        answer = solve(prompt)
        records.append({"prompt": prompt, "chosen": answer, "rejected": wrong_answer(prompt, rng), "answer": answer})
    return records


def corpus() -> list[str]:
    """Texts to train the character tokenizer on: every digit and operator of the task."""
    return [p + solve(p) for p in all_problems()[:200]] + ["0123456789+-="]


def split_problems(seed: int = 0, test: int = 500, dev: int = 500, ppo: int = 1000) -> dict[str, list[str]]:
    """Disjoint prompt splits: ``test``, ``dev``, ``ppo`` and the rest for ``train`` (SFT and reward model)."""
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    cuts = {"test": (0, test), "dev": (test, test + dev), "ppo": (test + dev, test + dev + ppo)}
    splits = {name: problems[a:b] for name, (a, b) in cuts.items()}
    splits["train"] = problems[test + dev + ppo :]
    return splits


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records atomically (a partial file never replaces a good one)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_files({path: "".join(json.dumps(record) + "\n" for record in records)})
