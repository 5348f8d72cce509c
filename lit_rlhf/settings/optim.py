"""The optimiser groups: optimiser, warm-up/decay schedule, gradient clipping (one model, or PPO's two)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from lit_rlhf.plain_data import as_group, import_object
from lit_rlhf.settings.common import LRScheduler, OptimizerCallable, _check, _choice


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """One trained model's optimiser, learning-rate schedule and gradient clipping."""

    optimizer: OptimizerCallable | None = None
    """any ``torch.optim`` class with its ``init_args`` (None = AdamW, fused kernel where possible, at
    the module's default learning rate)."""
    lr_scheduler: LRScheduler = "constant_with_warmup"
    """``transformers.get_scheduler``'s schedule: ``constant`` (no warm-up), ``constant_with_warmup``,
    ``linear`` / ``cosine`` to 0 at the run's last optimizer step, ``cosine_with_min_lr`` to ``min_lr_ratio``."""
    warmup_steps: int = 0
    """linear learning-rate warm-up from 0, in optimizer steps."""
    warmup_ratio: float = 0.0
    """warm-up as a fraction of the run's optimizer steps (rounded up; instead of ``warmup_steps``)."""
    min_lr_ratio: float | None = None
    """``cosine_with_min_lr``'s final learning rate as a fraction of the peak (None = 0.1)."""
    max_grad_norm: float | None = 1.0
    """clip the gradient norm to this (None = off)."""

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, Mapping):  # {class_path, init_args}, as in YAML and checkpoints
            object.__setattr__(self, "optimizer", _optimizer_from_config(self.optimizer))
        if self.optimizer is not None and not callable(self.optimizer):
            raise ValueError(f"optim.optimizer must be a torch.optim class with init_args, got {self.optimizer!r}")
        _check(self.warmup_steps >= 0, "optim", "warmup_steps", self.warmup_steps, ">= 0")
        _choice(self.lr_scheduler, get_args(LRScheduler), "optim", "lr_scheduler")
        _check_schedule(self)
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, "optim", "max_grad_norm", self.max_grad_norm, "> 0 (or null: no clipping)")


def _check_schedule(settings: OptimizerSettings) -> None:
    _check(0 <= settings.warmup_ratio < 1, "optim", "warmup_ratio", settings.warmup_ratio, "in [0, 1)")
    if settings.warmup_ratio and settings.warmup_steps:
        raise ValueError("optim.warmup_steps and optim.warmup_ratio are both set: give one of them")
    if settings.lr_scheduler == "constant" and (settings.warmup_steps or settings.warmup_ratio):
        raise ValueError("optim.lr_scheduler='constant' has no warm-up: use constant_with_warmup, or no warm-up")
    if settings.min_lr_ratio is None:
        return
    if settings.lr_scheduler != "cosine_with_min_lr":
        raise ValueError("optim.min_lr_ratio is read only by optim.lr_scheduler='cosine_with_min_lr'")
    _check(0 <= settings.min_lr_ratio <= 1, "optim", "min_lr_ratio", settings.min_lr_ratio, "in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class PPOOptimSettings:
    """PPO's two optimisers: the actor's and the critic's (separate parameters, separate steps)."""

    actor: OptimizerSettings = field(default_factory=OptimizerSettings)
    """the actor's optimiser (None optimizer = AdamW at lr 1e-6)."""
    critic: OptimizerSettings = field(default_factory=OptimizerSettings)
    """the critic's optimiser (None optimizer = AdamW at lr 1e-5); unused by critic-free estimators."""
    max_nonfinite_steps: int = 3
    """divergence guard: an optimizer step whose loss or gradient norm is not finite is skipped
    (gradients dropped, weights untouched); this many in a row stop the run with an error."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "actor", as_group(OptimizerSettings, self.actor))
        object.__setattr__(self, "critic", as_group(OptimizerSettings, self.critic))
        _check(self.max_nonfinite_steps >= 1, "optim", "max_nonfinite_steps", self.max_nonfinite_steps, ">= 1")


def _optimizer_from_config(config: Mapping[str, Any]) -> OptimizerCallable:
    if "class_path" not in config:
        raise ValueError(f"optim.optimizer needs a class_path (e.g. torch.optim.AdamW), got {dict(config)!r}")
    return functools.partial(import_object(config["class_path"], "optim.optimizer"), **config.get("init_args", {}))
