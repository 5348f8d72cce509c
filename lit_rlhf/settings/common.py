"""What every settings group shares: the value types and the checks that name the field."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

DType = Literal["float32", "bfloat16", "float16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
AdvantageEstimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
KLEstimator = Literal["k1", "k2", "k3"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"]
# the same type as Lightning's ``OptimizerCallable``: YAML gives ``class_path`` + ``init_args``
OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]

CRITIC_FREE: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")


def _check(condition: bool, group: str, name: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"{group}.{name} must be {requirement}, got {value!r}")


def _choice(value: Any, choices: tuple[str, ...], group: str, name: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {group}.{name} {value!r}; valid: {', '.join(choices)}")


def _check_path(value: str | None, group: str, name: str, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{group}.{name} must be a model directory or hub id, got {value!r}")
