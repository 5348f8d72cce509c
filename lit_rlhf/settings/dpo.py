"""The DPO group: the preference loss and where its reference log-probs come from."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lit_rlhf import functional as F
from lit_rlhf.functional import PreferenceLossType


@dataclass(frozen=True, kw_only=True)
class DPOSettings:
    """The preference loss and where its reference log-probs come from."""

    loss_type: PreferenceLossType = "sigmoid"
    """``sigmoid`` (DPO), ``ipo`` (on per-token average log-probs, as TRL) or ``hinge`` (SLiC)."""
    beta: float = 0.1
    """strength of the implicit KL to the reference (larger: stay closer); SimPO's reward scale with
    ``reference_free`` (about 2 there)."""
    label_smoothing: float = 0.0
    """conservative DPO: the assumed probability that a pair's preference is flipped (sigmoid loss only)."""
    reference_free: bool = False
    """SimPO: no reference model; the loss compares length-normalised log-probs with the margin ``gamma``."""
    gamma: float = 0.0
    """SimPO's target reward margin (``reference_free`` only)."""
    reference_cache: bool | None = None
    """compute the reference log-probs of every training and validation answer once, before the first
    step, instead of in every step (None: cache when the reference is a separate frozen model, compute
    on the fly when it is the policy with its LoRA adapter disabled)."""

    def __post_init__(self) -> None:
        if self.loss_type not in F.PREFERENCE_LOSSES:
            raise ValueError(f"unknown algorithm.loss_type {self.loss_type!r}; valid: {', '.join(F.PREFERENCE_LOSSES)}")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"algorithm.beta must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"algorithm.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r} "
                "(0.5 would make every preference a coin flip)"
            )
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"algorithm.label_smoothing is defined for the sigmoid loss only; with loss_type={self.loss_type!r} "
                "set it to 0 (or use loss_type: sigmoid)"
            )
        if self.reference_free and self.loss_type != "sigmoid":
            raise ValueError(
                "algorithm.reference_free (SimPO) uses the sigmoid loss; set loss_type: sigmoid "
                f"(got {self.loss_type!r})"
            )
        if self.reference_free and self.reference_cache is not None:
            raise ValueError(
                "algorithm.reference_free uses no reference log-probs: leave algorithm.reference_cache null"
            )
        if self.gamma and not self.reference_free:
            raise ValueError(
                f"algorithm.gamma ({self.gamma}) is SimPO's margin and only applies with reference_free: true; "
                "set it to 0 or turn reference_free on"
            )
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"algorithm.gamma must be >= 0, got {self.gamma!r}")

    def caches_reference(self, separate_reference: bool) -> bool:
        """``reference_cache`` resolved: by default only for a separate frozen reference model."""
        if self.reference_free:
            return False
        return separate_reference if self.reference_cache is None else self.reference_cache
