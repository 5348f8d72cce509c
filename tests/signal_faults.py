"""Signals for the stop-and-resume tests, sent from inside real runs (``--trainer.callbacks`` in subprocesses)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send ``signal_name`` to this process at epoch ``epoch``: before its rollout (``batch`` None) or at the
    start of mini-batch ``batch`` (a scheduler's preemption, or Ctrl-C). With ``marker``, only once: the
    file is created when the signal is sent, and a run that finds it (the resumed one) sends nothing.
    """

    def __init__(
        self, epoch: int, batch: int | None = None, signal_name: str = "SIGTERM", marker: str | None = None
    ) -> None:
        self.epoch, self.batch, self.signum, self.marker = epoch, batch, signal.Signals[signal_name], marker

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and self.batch is None:
            self.send()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.send()

    def send(self) -> None:
        if self.marker is not None:
            if os.path.exists(self.marker):
                return
            open(self.marker, "w").close()
        os.kill(os.getpid(), self.signum)
