"""Stopping a run on SIGTERM or Ctrl-C: at a point it resumes from exactly, with a checkpoint, a non-zero exit
and the command that resumes it.

Lightning notes a SIGTERM (``trainer.received_sigterm``) and raises ``SIGTERMException`` (a ``SystemExit``
whose code is 0) at the end of the current optimizer step or epoch. :class:`GracefulStop` builds on that:
Ctrl-C is treated the same way (a second Ctrl-C stops at once), a rollout stops between generation and
scoring steps (``lit_rlhf.rollout.progress.stop_requested``), the exit code becomes 143 (SIGTERM) or 130 (SIGINT), and a
checkpoint is saved where the state is whole:

- during a rollout: nothing of this epoch has been trained, the resumed run samples the same rollout again;
- between two optimizer steps of one process: the checkpoint also holds the rollout's experience and how
  many mini-batches were trained, and the resumed run trains the remaining ones (bit-identical losses);
- at an epoch's end: an ordinary end-of-epoch checkpoint.

Elsewhere (between steps with several processes, each holding its own experience, or a module without an
experience buffer) nothing new is saved and the message names the newest checkpoint instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from itertools import islice
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.checkpoints import looks_complete
from lit_rlhf.rollout.experience import Experience, ExperienceBuffer

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal's number, as a shell reports it
EXPERIENCE_KEY = "interrupted_rollout"


class ResumedBuffer(ExperienceBuffer):
    """An experience buffer restored from an interrupted epoch: its first pass skips the trained mini-batches."""

    skip: int = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        yield from islice(super().__iter__(), skip, None)


class GracefulStop(L.Callback):
    """On SIGTERM or Ctrl-C during ``fit``: stop at a safe point, save a checkpoint, exit 143 or 130.

    Args:
        resume_command: the command that resumes the run (the CLI passes its own); None prints the
            Python call instead.
    """

    def __init__(self, resume_command: str | None = None) -> None:
        self.resume_command = resume_command
        self.signal: signal.Signals | None = None
        self.saving_mid_epoch = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its SIGTERM handler; its teardown restores the handlers from before fit
        if threading.current_thread() is not threading.main_thread():
            return
        self.signal = None
        lightning_handler = signal.getsignal(signal.SIGTERM)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, whatever the state
            self.signal = signal.Signals(signum)
            print(f"\n{self.signal.name}: stopping at the next safe point (Ctrl-C again stops now)", file=sys.stderr)
            if callable(lightning_handler):
                lightning_handler(signum, frame)  # sets trainer.received_sigterm; tells the other ranks

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        exception.code = EXIT_CODES[self.signal or signal.SIGTERM]
        path, saved = self.checkpoint(trainer, pl_module)
        if trainer.is_global_zero:
            print(
                stop_message(self.signal or signal.SIGTERM, trainer, path, saved, self.resume_command), file=sys.stderr
            )

    def checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str | None, bool]:
        """Save where the state is whole (see the module's docstring); else name the newest checkpoint."""
        progress = trainer.fit_loop.epoch_progress.current
        mid_epoch = progress.started > progress.processed
        if mid_epoch and (
            trainer.world_size > 1 or not isinstance(getattr(pl_module, "buffer", None), ExperienceBuffer)
        ):
            return newest_saved(trainer), False
        if not mid_epoch and (same := saved_at_this_step(trainer)):
            return same, False
        path = os.path.join(
            checkpoint_dir(trainer), f"interrupted-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        )
        if progress.ready > progress.started:  # in on_train_epoch_start: the epoch's batch counters are still
            epoch_loop = trainer.fit_loop.epoch_loop  # the previous epoch's; count from 0, as the epoch would have
            for counter in (epoch_loop.batch_progress, epoch_loop.scheduler_progress):
                counter.reset_on_run()
            epoch_loop.automatic_optimization.optim_progress.reset_on_run()
            epoch_loop.val_loop.batch_progress.total.reset()
        self.saving_mid_epoch = mid_epoch
        try:
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            self.saving_mid_epoch = False
        return path, True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.saving_mid_epoch and pl_module.buffer.experience is not None:
            experience = {k: None if v is None else v.cpu() for k, v in vars(pl_module.buffer.experience).items()}
            batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            checkpoint[EXPERIENCE_KEY] = {"experience": experience, "batches_done": batches_done}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(EXPERIENCE_KEY)
        if saved is None:
            return
        old = pl_module.buffer
        buffer = ResumedBuffer(old.size, old.mini_batch_size, old.ppo_epochs, old.seed)
        buffer.fill(Experience(**saved["experience"]).to(pl_module.device))
        buffer.skip = saved["batches_done"]
        pl_module.buffer = buffer  # train_dataloader() wraps the module's buffer after this hook


def checkpoint_dir(trainer: L.Trainer) -> str:
    """The checkpoint callback's folder (the run's ``checkpoints/``, where ``--ckpt_path last`` looks)."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return dirpath or os.path.join(trainer.default_root_dir, "checkpoints")


def saved_at_this_step(trainer: L.Trainer) -> str | None:
    """A checkpoint a ``ModelCheckpoint`` already wrote at the current optimizer step, if any."""
    for callback in trainer.checkpoint_callbacks:
        path = (callback.last_model_path or callback.best_model_path) if isinstance(callback, ModelCheckpoint) else ""
        if path and getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
            return path
    return None


def newest_saved(trainer: L.Trainer) -> str | None:
    """The newest complete checkpoint in the run's checkpoint folder, if any."""
    folder = Path(checkpoint_dir(trainer))
    complete = [p for p in folder.glob("*.ckpt") if p.exists() and looks_complete(p.resolve())]
    return str(max(complete, key=lambda p: (p.resolve().stat().st_mtime, p.name == "last.ckpt"))) if complete else None


def stop_message(sig: signal.Signals, trainer: L.Trainer, path: str | None, saved: bool, command: str | None) -> str:
    """What stopped, what was saved, and how to resume."""
    where = f"rollout/epoch {trainer.current_epoch}, optimizer step {trainer.global_step}"
    if path is None:
        return f"{sig.name}: stopped at {where}; no checkpoint to resume from yet (the run starts afresh)."
    state = "saved checkpoint" if saved else "nothing new to save since checkpoint"
    resume = command or f"trainer.fit(module, datamodule=data, ckpt_path={path!r})"
    return f"{sig.name}: stopped at {where}; {state} {path}\nResume with: {resume}"
