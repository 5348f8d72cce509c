"""RolloutCallback: fills the PPO module's experience buffer at the start of every epoch."""

from __future__ import annotations

import lightning as L


class RolloutCallback(L.Callback):
    """One rollout per epoch: at each epoch start it asks the module for rollout ``k`` (the epoch)
    and puts it into the module's experience buffer.

    The rollout is the module's (``collect_rollout``: its runner samples with its engine and scores
    with its reward scorer); this callback is only the trigger. Rollout ``k`` is a pure function of
    ``k``, the run's seed, the rank and the weights, so a resumed run regenerates exactly what an
    uninterrupted one would.
    """

    def __init__(self) -> None:
        self.last_timing: dict[str, float] = {}  # the latest rollout's phase seconds (benchmarks read it)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rollout = pl_module.collect_rollout(trainer.current_epoch)
        pl_module.buffer.fill(rollout.experience)
        self.last_timing = rollout.timing

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A fit that fails stops the engine it started (Lightning skips the module's ``teardown``
        then, and a vLLM engine would keep its processes and its memory)."""
        pl_module.teardown("fit")
