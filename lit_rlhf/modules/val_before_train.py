"""Validation before the first update (verl's ``trainer.val_before_train``): curves start from the SFT baseline."""

from __future__ import annotations

import lightning as L


def validate_before_training(trainer: L.Trainer) -> bool:
    """Run the fit's validation loop once before any optimizer step; its ``val/`` metrics land at step 0.

    Called from a module's ``on_train_start``. A resumed run (or one without validation batches)
    skips it: the baseline belongs to the run's start, which its ``metrics.csv`` already holds.

    Returns:
        Whether validation ran.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    fresh = trainer.global_step == 0 and trainer.current_epoch == 0 and not trainer.fit_loop.restarting
    if not fresh or not trainer.enable_validation or trainer.sanity_checking:
        return False
    # what Lightning's epoch loop does around its own validation inside fit (training_epoch_loop.on_advance_end)
    trainer.validating = True
    val_loop.run()
    trainer.training = True
    # the epoch's own validation counts its batches from 0 again
    val_loop.batch_progress.total.reset()
    return True
