"""The shared shape of the single-model stages (SFT, reward model): settings, optimiser, export."""

from __future__ import annotations

import lightning as L

from lit_rlhf.checkpoints import add_digest, verify_digest
from lit_rlhf.modules.outputs import check_outputs, export_directory, run_directory
from lit_rlhf.modules.schedule import make_optimizer, optimizer_with_schedule
from lit_rlhf.quiet import quiet_run
from lit_rlhf.settings import ModelSettings, OptimizerSettings, as_group, save_settings, to_plain


class SingleModelModule(L.LightningModule):
    """A LightningModule that trains one model (automatic optimisation) from the shared groups.

    Subclasses set ``self.trained`` (the module the optimiser sees) in ``configure_model`` and
    implement ``export_pretrained``.

    Args:
        models: the model to train and how it is loaded.
        optim: optimiser, warm-up/decay schedule and gradient clipping.
        export_dir: where ``on_train_end`` writes the Hugging Face checkpoint (None = ``export/`` in the run
            directory).
        default_lr: the learning rate of the default AdamW.
        extra_hparams: the subclass's own settings, recorded with the groups.
    """

    export_kind = "model"  # what the export holds: an earlier export of the same kind is all it replaces

    def __init__(
        self,
        models: ModelSettings,
        optim: OptimizerSettings,
        export_dir: str | None,
        default_lr: float,
        extra_hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.models = as_group(ModelSettings, models)
        self.optim = as_group(OptimizerSettings, optim)
        self.export_dir, self.default_lr = export_dir, default_lr
        plain = {"models": to_plain(self.models), "optim": to_plain(self.optim), "export_dir": export_dir}
        save_settings(self, {**plain, **(extra_hparams or {})})
        self.trained = None
        self.run_dir = "."  # set in setup(): lit-rlhf's <root>/version_<N>

    def setup(self, stage: str) -> None:
        """Find the run directory (on every rank) and, before any model loads, check the outputs."""
        self.run_dir = run_directory(self.trainer)  # on every rank: a collective under DDP
        if stage == "fit":  # an unwritable or unsafe export_dir fails now, not after training
            check_outputs(self.trainer, self.export_dir, self.run_dir, self.export_kind)
        quiet_run(self.trainer)  # what the CLI prints, from Python too
        if self.trainer.gradient_clip_val is not None:
            raise ValueError(
                "gradient clipping is a module setting here: set model.init_args.optim.max_grad_norm "
                "instead of trainer.gradient_clip_val"
            )

    def configure_optimizers(self):
        optimizer = make_optimizer(self.optim.optimizer, self.trained, self.default_lr)
        return optimizer_with_schedule(optimizer, self.optim, self.trainer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.optim.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.max_grad_norm, gradient_clip_algorithm="norm")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        add_digest(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        verify_digest(checkpoint, self.trainer.ckpt_path if self._trainer is not None else None)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.export_pretrained(export_directory(self.export_dir, self.run_dir))

    def export_pretrained(self, directory: str, merge_lora: bool = True) -> dict[str, str]:
        """Write the stage's model as a Hugging Face checkpoint; each stage (SFT, reward model) implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement export_pretrained")
