"""Optimizers and learning-rate schedules shared by the modules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def cosine_with_warmup(warmup: int, decay: str, total: int | float | None) -> Callable[[int], float]:
    """Multiplier per optimizer step: linear warm-up to 1, then ``constant`` or ``cosine`` to 0 at ``total``."""
    if decay not in ("constant", "cosine"):
        raise ValueError(f"unknown lr_decay {decay!r}; valid: constant, cosine")
    if decay == "cosine" and (not total or math.isinf(total)):
        raise ValueError("lr_decay='cosine' needs a finite run length (trainer.max_epochs or max_steps)")

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def optimizer_with_schedule(optimizer, warmup: int, decay: str, trainer) -> dict:
    """Lightning's optimizer config: ``optimizer`` with a per-step warm-up/cosine ``LambdaLR``."""
    schedule = cosine_with_warmup(warmup, decay, trainer.estimated_stepping_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_optimizer(factory, model: torch.nn.Module, default_lr: float) -> torch.optim.Optimizer:
    """``factory`` (an ``OptimizerCallable``) over ``model``'s trainable parameters, or AdamW at ``default_lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if factory is None:
        return torch.optim.AdamW(params, lr=default_lr, foreach=True)
    return factory(params)
