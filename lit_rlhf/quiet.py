"""A quiet console: warnings known to be harmless here are silenced, with the reason written down.

Nothing that signals a real problem is filtered: only these exact messages. The CLI applies
:func:`quiet` first thing; importing ``lit_rlhf.modules`` applies it too (so a ``Trainer`` built in
Python after the import prints no adverts either), and every module's ``setup`` applies
:func:`quiet_run` (again, and to the run's progress bar), so the Python API prints what the CLI prints.
"""

from __future__ import annotations

import logging
import types
import warnings

import lightning as L

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
    (
        r"`is_gradient_checkpointing` is deprecated.*",
        "raised inside peft's get_peft_model (lit_rlhf's own calls use the new activation-checkpointing names)",
    ),
    (
        r"`gradient_checkpointing_enable` is deprecated.*",
        "raised inside peft's prepare_model_for_kbit_training (4-bit runs); lit_rlhf calls the new name",
    ),
    (
        r"Starting from v1.9.0, `tensorboardX` has been removed.*",
        "a Trainer with the default logger writes metrics.csv, which is what lit_rlhf's runs keep anyway",
    ),
]


class _DropTips(logging.Filter):
    """Lightning's advertisement of another logging service at start-up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


_DROP_TIPS = _DropTips()  # one instance: applying quiet() again adds no second filter


def quiet() -> None:
    """Silence the harmless warnings above, Lightning's tips, and transformers' per-file progress bars.

    Applying it again is harmless (it puts the same filters first again, e.g. inside a
    ``warnings.catch_warnings`` block that added its own).
    """
    for pattern, _reason in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DROP_TIPS)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" and "Writing model shards" for every model


def quiet_run(trainer: L.Trainer) -> None:
    """:func:`quiet`, and the run's progress bar without the logger's version (``v_num``: the run folder
    names it) and without ``Epoch k/-2`` when the run is counted in steps (``max_epochs: -1``).
    """
    quiet()
    bar = trainer.progress_bar_callback
    if bar is None or getattr(bar, "_lit_rlhf_quiet", False):
        return
    bar._lit_rlhf_quiet = True
    standard = bar.get_metrics

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return {k: v for k, v in standard(trainer, pl_module).items() if k != "v_num"}

    bar.get_metrics = types.MethodType(get_metrics, bar)
    if hasattr(bar, "_get_train_description"):  # the rich bar adds "/<max_epochs - 1>" to the epoch
        describe = bar._get_train_description

        def train_description(self, current_epoch: int) -> str:
            text = describe(current_epoch)
            max_epochs = self.trainer.max_epochs
            return text if max_epochs is None or max_epochs > 0 else text.replace(f"/{max_epochs - 1}", "", 1)

        bar._get_train_description = types.MethodType(train_description, bar)
