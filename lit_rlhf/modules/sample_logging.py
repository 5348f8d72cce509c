"""SampleLoggingCallback: a table of sample responses a person can read, right after a rollout."""

from __future__ import annotations

import lightning as L

from lit_rlhf.rollout.samples import LastRollout, log_samples, sample_rows


class SampleLoggingCallback(L.Callback):
    """Logs sample responses every ``every_n_rollouts`` rollouts, on rank 0, right after the rollout.

    Put it after the :class:`~lit_rlhf.rollout.RolloutCallback` (Lightning runs callbacks in list
    order): it reads the module's ``last_rollout``, which the module sets when it collects a rollout.

    Args:
        every_n_rollouts: log rollouts 0, N, 2N, ... (0 = never: no table, no ``samples.jsonl``, no W&B table).
        num_samples: rows in each table, spread over the rollout's prompts.
    """

    def __init__(self, every_n_rollouts: int = 1, num_samples: int = 8) -> None:
        if every_n_rollouts < 0 or num_samples < 0:
            raise ValueError(
                "log_samples_every_n_rollouts and num_logged_samples must be >= 0 (0 = never), "
                f"got {every_n_rollouts}, {num_samples}"
            )
        self.every_n_rollouts, self.num_samples = every_n_rollouts, num_samples

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record: LastRollout | None = getattr(pl_module, "last_rollout", None)
        pl_module.last_rollout = None  # read once: keeps no reference to the experience past this hook
        every = self.every_n_rollouts
        if record is None or not every or record.index % every or not trainer.is_global_zero:
            return
        n = pl_module.generation.n_samples_per_prompt
        samples = sample_rows(record, n, self.num_samples, pl_module.tokenizer)
        log_samples(trainer, pl_module.run_dir, samples, record.index)
