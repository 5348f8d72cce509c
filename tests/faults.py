"""Faults for the reliability tests, injected into real runs (``--trainer.callbacks`` in subprocesses)."""

from __future__ import annotations

import os
import signal
import time

import lightning as L

from lit_rlhf.rollout import NativeEngine


class KillAt(L.Callback):
    """SIGKILL this process at the start of mini-batch ``batch`` of epoch ``epoch`` (a preempted job)."""

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class KillMidRollout(L.Callback):
    """SIGKILL this process in rollout ``epoch``, right after the engine's ``call``-th generate call of that
    rollout returns (an asynchronous rollout calls it once per segment: a preemption mid-generation)."""

    def __init__(self, epoch: int, call: int = 2) -> None:
        self.epoch, self.call = epoch, call

    def on_fit_start(self, trainer, pl_module) -> None:
        engine, calls = pl_module.rollout.engine, [0]
        generate = engine.generate

        def killing(*args, **kwargs):
            samples = generate(*args, **kwargs)
            if trainer.current_epoch == self.epoch:
                calls[0] += 1
                if calls[0] == self.call:
                    os.kill(os.getpid(), signal.SIGKILL)
            return samples

        engine.generate = killing


class KillDuringSave(L.Callback):
    """SIGKILL this process half-way through writing checkpoint number ``save`` (1-based)."""

    def __init__(self, save: int = 2) -> None:
        self.save = save

    def setup(self, trainer, pl_module, stage) -> None:
        import lit_rlhf.checkpoints as checkpoints

        original, count = checkpoints.torch.save, [0]

        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] == self.save:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original(obj, f, *args, **kwargs)

        checkpoints.torch.save = save


def full_disk_at_save(monkeypatch, save: int = 2) -> None:
    """Checkpoint write number ``save`` (1-based) goes to ``/dev/full``: the real ``torch.save`` then fails
    exactly as on a full disk (torch's ``[enforce fail at inline_container.cc]``, the ENOSPC only as context).
    """
    import lit_rlhf.checkpoints as checkpoints

    count = [0]

    def open_partial(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        if "w" in mode and str(path).endswith(".partial"):
            count[0] += 1
            if count[0] == save:
                full = os.open("/dev/full", os.O_WRONLY)
                os.dup2(full, f.fileno())
                os.close(full)
        return f

    monkeypatch.setattr(checkpoints, "open", open_partial, raising=False)


class SlowEngine(NativeEngine):
    """The native sampler, ``step_s`` seconds slower per decoding step: a generation long enough for a
    weight push to arrive while it decodes."""

    def __init__(self, step_s: float = 0.1) -> None:
        super().__init__()
        self.step_s = step_s

    def generate(self, requests, generation, on_token=None):
        def slow(done: int, total: int) -> bool | None:
            time.sleep(self.step_s)
            return on_token(done, total) if on_token is not None else None

        return super().generate(requests, generation, slow)
