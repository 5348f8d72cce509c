"""Optimizers and learning-rate schedules shared by the modules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lit_rlhf.settings import OptimizerSettings


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


def optimizer_with_schedule(optimizer, settings: OptimizerSettings, trainer) -> dict:
    """Lightning's optimizer config: ``optimizer`` with a per-step warm-up/cosine ``LambdaLR``."""
    schedule = cosine_with_warmup(settings.warmup_steps, settings.lr_decay, trainer.estimated_stepping_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_optimizer(factory, model: torch.nn.Module, default_lr: float) -> torch.optim.Optimizer:
    """``factory`` (an ``OptimizerCallable``) over ``model``'s trainable parameters, or AdamW at ``default_lr``.

    The default AdamW uses the fused kernel where every parameter allows it (plain CPU/CUDA float
    tensors: one kernel per step, about 8x faster than ``foreach`` on CPU, same update within
    float tolerance) and ``foreach`` otherwise (e.g. FSDP2's sharded DTensor parameters).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if factory is None:
        return torch.optim.AdamW(params, lr=default_lr, **adamw_kernel(params))
    return factory(params)


def adamw_kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` when the fused AdamW kernel supports all ``params``, else ``{"foreach": True}``."""
    from torch.distributed.tensor import DTensor

    fusable = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and not isinstance(p, DTensor) for p in params
    )
    return {"fused": True} if params and fusable else {"foreach": True}
