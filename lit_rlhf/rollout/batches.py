"""What a rollout passes between its steps: the sampled and the scored rollout, an asynchronous
rollout's additions, the callables the runner is given, and two small helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lit_rlhf.models import GenerationOutput
from lit_rlhf.rewards.scorer import Scores
from lit_rlhf.rollout.experience import Experience
from lit_rlhf.rollout.multi_turn.loop import TrajectoryResult

# (generation, prompt texts per row, dataset columns per row) -> scores: a RewardScorer
ScoreFn = Callable[[GenerationOutput, list[str], dict[str, list]], Scores]
# (stream positions, count=True) -> a PromptDataModule batch of those prompts (count: the truncation counter)
PromptsAt = Callable[..., dict]
# (phase, done, total): a progress display
Progress = Callable[[str, int, int], None]


def no_progress(phase: str, done: int, total: int) -> None:
    """Report nothing."""


class Sampled(NamedTuple):
    """What ``RolloutRunner.sample`` returns: the responses of one rollout, not yet scored.

    rollout: the rollout's index. generation: the packed samples, one row per response (a prompt's
    samples contiguous). prompts, columns: each row's prompt text and dataset columns.
    generation_s: seconds spent sampling (and, multi-turn, waiting for tools and environments).
    trajectories: a multi-turn rollout's trajectories, one per row (None: single-turn).
    """

    rollout: int
    generation: GenerationOutput
    prompts: list[str]
    columns: dict[str, list]
    generation_s: float
    trajectories: list[TrajectoryResult] | None = None
    versions: Tensor | None = None
    """``[B, A]`` each response token's policy version (None: all ``rollout``'s, a synchronous rollout)."""
    carry: dict[str, float] | None = None
    """an asynchronous rollout's ``dropped_rows``, ``carried_over_rows`` and ``decode_steps``."""
    prompt_batch: dict | None = None
    """an asynchronous rollout's prompts (a ``PromptDataModule`` batch, one row per trained group)."""


class Rollout(NamedTuple):
    """A scored rollout: its experience, each reward part ``[B]`` and the phases' seconds; a multi-turn
    rollout's trajectories (conversations, turns, tool calls) too."""

    experience: Experience
    reward_parts: dict[str, Tensor]
    timing: dict[str, float]
    trajectories: list[TrajectoryResult] | None = None


class Carried(NamedTuple):
    """What an asynchronous rollout adds to its ``Rollout``: ``counts`` (``dropped_rows``,
    ``carried_over_rows``, ``decode_steps``) and ``prompts``, the batch of the trained groups' prompts."""

    counts: dict[str, float]
    prompts: dict


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None):
    """Put modules in eval mode (no dropout, no grad-only behaviour), restoring their modes after."""
    live = [m for m in modules if m is not None]
    modes = [m.training for m in live]
    for m in live:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(live, modes, strict=True):
            m.train(mode)


def repeat_rows(values: list, times: int) -> list:
    """Each entry ``times`` times in a row (a prompt's samples stay contiguous)."""
    return [value for value in values for _ in range(times)]
