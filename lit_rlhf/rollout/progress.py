"""The rollout's phase on the trainer's progress bar: ``Epoch 3 · generating 12/48``, then scoring, training."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException


def stop_requested(trainer: L.Trainer) -> bool:
    """Whether a rollout in progress should stop now: SIGTERM or Ctrl-C came, and stopping loses nothing.

    One process only (ranks would stop at different points). Stopping before the rollout has filled the
    buffer leaves the state of the epoch's start: a resumed run samples the same rollout again.
    """
    return trainer.received_sigterm and trainer.world_size == 1


class PhaseProgress:
    """Report ``(phase, done, total)``; the train bar's description shows it (at most every ``interval`` s).

    A run without a progress bar (or with another kind) is left alone. Each report is also where a
    rollout stops for SIGTERM or Ctrl-C (see :func:`stop_requested`).
    """

    def __init__(self, trainer: L.Trainer, interval: float = 0.2) -> None:
        self.trainer = trainer
        bar = trainer.progress_bar_callback
        self.bar = bar if bar is not None and bar.is_enabled else None
        self.epoch, self.interval, self.last = trainer.current_epoch, interval, 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if stop_requested(self.trainer):
            raise SIGTERMException
        now = time.perf_counter()
        if done not in (0, total) and now - self.last < self.interval:
            return
        self.last = now
        self.describe(f"Epoch {self.epoch} · {phase} {done}/{total}")

    def training(self) -> None:
        """The rollout is scored (the buffer is not filled yet: a stop here still loses nothing)."""
        if stop_requested(self.trainer):
            raise SIGTERMException
        self.describe(f"Epoch {self.epoch} · training")

    def describe(self, text: str) -> None:
        bar = self.bar
        if isinstance(bar, RichProgressBar) and bar.progress is not None and bar.train_progress_bar_id is not None:
            style = bar.theme.description
            bar.progress.update(bar.train_progress_bar_id, description=f"[{style}]{text}" if style else text)
            bar.refresh()
        elif isinstance(bar, TQDMProgressBar) and getattr(bar, "_train_progress_bar", None) is not None:
            bar.train_progress_bar.set_description(text, refresh=True)
