"""A quiet console: warnings known to be harmless here are silenced, with the reason written down.

Nothing that signals a real problem is filtered: only these exact messages.
"""

from __future__ import annotations

import logging
import warnings

# (message pattern, why it does not apply to lit_rlhf's runs)
HARMLESS_WARNINGS = [
    (
        r".*Your `IterableDataset` has `__len__` defined.*",
        "the PPO train loader is the experience buffer, read in one process; its length is exact",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training.*",
        "the frozen models (reference, reward) are in eval mode on purpose",
    ),
    (
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
        "raised inside Lightning's own code for every run; nothing to change in a config",
    ),
    (
        r"Precision .* is not supported by the model summary.*",
        "only the size estimate of the model summary table is affected",
    ),
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval.*",
        "PPO logs every optimizer step itself (it sets log_every_n_steps to 1)",
    ),
]


class _DropTips(logging.Filter):
    """Lightning's advertisement of another logging service at start-up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet() -> None:
    """Silence the harmless warnings above, Lightning's tips, and transformers' per-file progress bars."""
    for pattern, _reason in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" and "Writing model shards" for every model
