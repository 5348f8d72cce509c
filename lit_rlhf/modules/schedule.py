"""Optimizers and learning-rate schedules shared by the modules."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from lit_rlhf.settings import OptimizerSettings


def warmup_steps(settings: OptimizerSettings, total: int | float | None) -> int:
    """The warm-up length in optimizer steps: ``warmup_steps``, or ``ceil(warmup_ratio * total)`` as in
    transformers' ``TrainingArguments.get_warmup_steps``.
    """
    if not settings.warmup_ratio:
        return settings.warmup_steps
    if not total or math.isinf(total):
        raise ValueError(
            "optim.warmup_ratio needs a finite run length: set trainer.max_epochs or trainer.max_steps "
            "(or give optim.warmup_steps instead)"
        )
    return math.ceil(settings.warmup_ratio * total)


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimizerSettings, total: int | float | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """``transformers.get_scheduler(settings.lr_scheduler)`` over ``total`` optimizer steps, stepped once per step.

    Args:
        optimizer: the optimizer whose learning rate the schedule multiplies.
        settings: the group naming the schedule, its warm-up and (``cosine_with_min_lr``) its floor.
        total: the optimizer steps the run makes (None or ``inf``: unbounded, only for constant schedules).

    Raises:
        ValueError: a decaying schedule or ``warmup_ratio`` without a finite run length.
    """
    name = settings.lr_scheduler
    warmup = warmup_steps(settings, total)
    finite = bool(total) and not math.isinf(total)
    if name in ("linear", "cosine", "cosine_with_min_lr") and not finite:
        raise ValueError(
            f"optim.lr_scheduler={name!r} decays over the whole run and needs a finite run length: set "
            "trainer.max_epochs or trainer.max_steps (or optim.lr_scheduler: constant_with_warmup)"
        )
    # constant_with_warmup is LambdaLR(1.0) at warmup 0: one code path for both constants
    name = "constant_with_warmup" if name == "constant" else name
    floor = 0.1 if settings.min_lr_ratio is None else settings.min_lr_ratio
    extra = {"min_lr_rate": floor} if name == "cosine_with_min_lr" else None
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=int(total) if finite else None,
        scheduler_specific_kwargs=extra,
    )


def ppo_total_steps(max_epochs: int | None, max_steps: int, steps_per_rollout: int, optimizers: int) -> int | None:
    """Optimizer steps of each PPO optimizer: ``steps_per_rollout`` per epoch, capped by ``max_steps``.

    Lightning's ``global_step`` counts every optimizer's steps under manual optimization, so
    ``max_steps`` is shared by the actor's and the critic's optimizers. None: unbounded.
    """
    total = max_epochs * steps_per_rollout if max_epochs is not None and max_epochs >= 0 else None
    if max_steps is not None and max_steps >= 0:
        capped = max_steps // optimizers
        total = capped if total is None else min(total, capped)
    return total


def optimizer_with_schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings, trainer) -> dict:
    """Lightning's optimizer config: ``optimizer`` with its per-step schedule over the run's optimizer steps."""
    scheduler = make_scheduler(optimizer, settings, trainer.estimated_stepping_batches)
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
