"""Sample responses a person can read: rows spread over a rollout's prompts, to the console,
``samples.jsonl`` and W&B (the ``SampleLoggingCallback`` in ``lit_rlhf.modules.sample_logging`` calls these).

The rows spread over the rollout's prompts (the first sample of each prompt, then the second
samples, ...), and the prompt column shows the user's turn, not the whole rendered chat template.
The table goes to the console, to ``samples.jsonl`` in the run directory and to W&B.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from rich.console import Console
from rich.table import Table
from torch import Tensor

from lit_rlhf.data.prompts import MESSAGES_COLUMN
from lit_rlhf.models.actor import response_texts
from lit_rlhf.rollout.experience import Experience

HIDDEN_IN_CONSOLE = (
    "rollout",
    "rendered_prompt",
    "messages",
    "trained_text",
)  # in samples.jsonl and W&B, too long or constant for the console


@dataclass
class LastRollout:
    """What the PPO module keeps of its latest rollout for the sample logger (this rank's rollout).

    Attributes:
        index: the rollout number.
        experience: the rollout's experience, ``n_samples_per_prompt`` contiguous rows per prompt.
        reward_parts: each reward component's ``[B]`` scores, by name.
        prompts: ``[P]`` rendered prompts, as the policy saw them.
        columns: the prompt batch's other fields, ``[P]`` each (``prompt_messages`` with a chat template).
    """

    index: int
    experience: Experience
    reward_parts: dict[str, Tensor]
    prompts: list[str]
    columns: dict[str, list]
    trajectories: list | None = None  # a multi-turn rollout's, one per row (TrajectoryResult)


def spread_rows(num_prompts: int, samples_per_prompt: int, k: int) -> list[int]:
    """Row numbers of ``k`` samples spread over prompts whose samples are contiguous.

    The first sample of each prompt, then each prompt's second sample, and so on: with 4 prompts
    of 8 samples and ``k=8`` the rows are ``[0, 8, 16, 24, 1, 9, 17, 25]``.
    """
    order = [p * samples_per_prompt + s for s in range(samples_per_prompt) for p in range(num_prompts)]
    return order[: max(k, 0)]


def user_turn(messages: list[dict] | None, rendered: str) -> str:
    """The content of the last user message, or ``rendered`` for a prompt used as raw text."""
    for message in reversed(messages or []):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return rendered  # raw text is the prompt as written (no template was applied)


def sample_rows(record: LastRollout, samples_per_prompt: int, k: int, tokenizer) -> list[dict]:
    """Up to ``k`` rows spread over prompts: prompt (the user's turn), response, reward, each reward part.

    Each row also says which sample of its prompt it is (``sample``) and keeps what the policy saw
    (``rendered_prompt``). A multi-turn row adds its conversation (``messages``), ``turns``,
    ``tool_calls`` and ``trained_text``: the decoded tokens it was trained on, alone.
    """
    experience, num_prompts = record.experience, len(record.prompts)
    rows = spread_rows(num_prompts, samples_per_prompt, min(k, len(experience)))
    if not rows:
        return []
    picked = experience.index(torch.tensor(rows, device=experience.sequences.device))
    texts = response_texts(tokenizer, picked.sequences, picked.attention_mask, picked.num_actions)
    scores = picked.scores.float().tolist()
    parts = {name: values.float().tolist() for name, values in record.reward_parts.items()}
    messages = record.columns.get(MESSAGES_COLUMN) or [None] * num_prompts
    samples = []
    for j, row in enumerate(rows):
        prompt, sample = divmod(row, samples_per_prompt)
        rendered = record.prompts[prompt]
        samples.append(
            {
                "rollout": record.index,
                "sample": sample,
                "prompt": user_turn(messages[prompt], rendered),
                "response": texts[j],
                "reward": scores[j],
                **{name: values[row] for name, values in parts.items()},
                "rendered_prompt": rendered,
            }
        )
        if record.trajectories is not None:
            samples[-1].update(turn_fields(record.trajectories[row], picked.index(slice(j, j + 1)), tokenizer))
    return samples


def turn_fields(trajectory, row: Experience, tokenizer) -> dict:
    """A multi-turn sample's conversation, turns, tool calls and the text of its trainable tokens."""
    ids = row.sequences[0, -row.num_actions :][row.loss_mask[0]]
    return {
        "messages": trajectory.trajectory.messages,
        "turns": trajectory.trajectory.turns,
        "tool_calls": sum(trajectory.tool_calls.values()),
        "trained_text": tokenizer.decode(ids.tolist(), skip_special_tokens=True),
    }


def log_samples(trainer: L.Trainer, run_dir: str, samples: list[dict], rollout: int) -> None:
    """Samples to the console (a table), to ``samples.jsonl`` in the run directory, and to W&B (a table
    under a key per rollout, so older tables stay visible).
    """
    if not samples:
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "samples.jsonl"), "a") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    columns = list(samples[0])
    shown = [name for name in columns if name not in HIDDEN_IN_CONSOLE]
    table = Table(title=f"samples, rollout {rollout}", show_lines=False)
    for name in shown:
        table.add_column(name, overflow="fold", max_width=48 if name in ("prompt", "response") else 12)
    for sample in samples:
        table.add_row(*[_cell(sample[name]) for name in shown])
    bar = trainer.progress_bar_callback
    console = getattr(bar, "_console", None) or Console()
    console.print(table)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            data = [[table_value(value) for value in sample.values()] for sample in samples]
            logger.log_table(key=f"samples/rollout_{rollout}", columns=columns, data=data)


def table_value(value):
    """A W&B table cell: numbers and text as they are, a conversation (lists, dicts) as its JSON text
    (W&B types a column by its first row, and messages differ in their keys: a tool message has a name)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else repr(value)[1:-1] if isinstance(value, str) else str(value)
