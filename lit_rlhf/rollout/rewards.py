"""Sequence rewards: checking what a reward returns, and loading a reward function by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

RewardFn = Callable[[list[str], list[str]], Tensor]


class RewardError(ValueError):
    """A reward raised, returned the wrong shape, or returned a non-finite value."""


def import_reward_fn(path: str) -> RewardFn:
    """Import ``package.module.function`` (a callable ``(prompts, responses) -> Tensor[B]``)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"reward_fn must be 'package.module.function', got {path!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward_fn {path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward_fn {path!r} is not callable")
    return fn


def call_reward(fn: RewardFn, name: str, prompts: list[str], responses: list[str], device: torch.device) -> Tensor:
    """Call ``fn`` and check its result (see :func:`check_scores`).

    Raises:
        RewardError: naming the reward ``name`` and, for bad values, the offending sample.
    """
    try:
        scores = fn(prompts, responses)
    except Exception as err:
        raise RewardError(f"reward {name} raised {type(err).__name__}: {err}") from err
    scores = torch.as_tensor(scores, dtype=torch.float32, device=device)
    return check_scores(scores, name, len(prompts), lambda i: (prompts[i], responses[i]))


def check_scores(scores: Tensor, name: str, batch_size: int, sample: Callable[[int], tuple[str, str]]) -> Tensor:
    """Check that ``scores`` is a finite tensor of shape ``[batch_size]``.

    ``sample(i)`` gives the prompt and response of row ``i``; it is called only to describe a bad row.
    """
    if scores.shape != (batch_size,):
        raise RewardError(
            f"reward {name} returned shape {tuple(scores.shape)}; expected ({batch_size},): one score per response"
        )
    finite = torch.isfinite(scores)
    if not bool(finite.all()):  # one sync per scoring call
        i = int((~finite).nonzero()[0])
        prompt, response = sample(i)
        raise RewardError(
            f"reward {name} returned {scores[i].item()} for sample {i} "
            f"(prompt {prompt!r}, response {response!r}); rewards must be finite"
        )
    return scores
