"""Precision chosen from what the hardware does fast: bf16 autocast only where bf16 is native.

On a CPU without AVX512-BF16 or AMX, bf16 matrix products are emulated and 20-60x slower than
fp32; on such a machine ``bf16-mixed`` turns a 4-minute SFT stage into more than an hour. In a
config::

    trainer:
      plugins:
        - class_path: lit_rlhf.precision.AutoPrecision
          init_args: {mode: auto}        # or bf16-mixed / 32-true to force one
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator
from typing import Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

log = logging.getLogger(__name__)
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (fast), not by emulation."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS))


class AutoPrecision(MixedPrecision):
    """bf16 autocast (weights stay fp32) where bf16 is native, fp32 elsewhere.

    Args:
        mode: ``auto`` decides from the hardware; ``bf16-mixed`` or ``32-true`` forces one.
        device: ``cpu`` or ``cuda`` (default: ``cuda`` when a GPU is present).
    """

    def __init__(self, mode: Literal["auto", "bf16-mixed", "32-true"] = "auto", device: str | None = None) -> None:
        if mode not in ("auto", "bf16-mixed", "32-true"):
            raise ValueError(f"AutoPrecision mode must be auto, bf16-mixed or 32-true, got {mode!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__("bf16-mixed", device)
        self.bf16 = mode == "bf16-mixed" or (mode == "auto" and native_bf16(device))
        self.precision = "bf16-mixed" if self.bf16 else "32-true"
        if mode == "auto":
            why = (
                "it computes bf16 natively"
                if self.bf16
                else f"it has no native bf16 ({' or '.join(NATIVE_BF16_CPU_FLAGS)}), where bf16 is 20-60x slower"
            )
            log.info("precision %s on this %s: %s", self.precision, device.upper(), why)

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        if self.bf16:
            with self.autocast_context_manager():
                yield
        else:
            yield
