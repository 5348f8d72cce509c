"""RewardModelModule: a scalar-head model trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from lit_rlhf.models import LoadSettings, LoraSettings, ValueModel, load_tokenizer
from lit_rlhf.models.loading import AttnImplementation, DType
from lit_rlhf.modules.schedule import make_optimizer, optimizer_with_schedule


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0) -> Tensor:
    """``-log sigmoid(r_chosen - r_rejected - margin)``, averaged over pairs."""
    return -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()


class RewardModelModule(L.LightningModule):
    """Reward-model training: ``score(chosen)`` should exceed ``score(rejected)``.

    The exported checkpoint is a ``*ForSequenceClassification`` model that PPO loads as its reward
    model and critic initialisation; it stores the mean/std of its scores on the validation pairs
    for ``normalize_reward``.

    Args:
        model_path: initialisation (an SFT causal LM gets a new scalar head).
        optimizer: optimizer (None = AdamW, lr 1e-5).
        margin: Bradley-Terry margin (the score gap below which a pair still has loss).
        warmup_steps: linear learning-rate warm-up steps.
        lr_decay: ``constant`` or ``cosine`` after warm-up.
        dtype: weights dtype.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (gpu extra).
        lora_rank: LoRA rank (0 = full fine-tuning).
        lora_alpha: LoRA alpha.
        export_dir: where ``on_train_end`` writes the Hugging Face checkpoint (None = nowhere).
    """

    def __init__(
        self,
        model_path: str,
        optimizer: OptimizerCallable | None = None,
        margin: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: Literal["constant", "cosine"] = "cosine",
        dtype: DType = "float32",
        attn_implementation: AttnImplementation = "sdpa",
        lora_rank: int = 0,
        lora_alpha: int = 16,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        self.tokenizer = load_tokenizer(model_path, padding_side="right")
        self.model: ValueModel | None = None
        self.train_accuracy, self.val_accuracy = MeanMetric(), MeanMetric()
        self.val_scores: list[Tensor] = []

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            lora = LoraSettings(hp.lora_rank, hp.lora_alpha)
            settings = LoadSettings(hp.dtype, hp.attn_implementation, lora)
            self.model = ValueModel.from_pretrained(hp.model_path, settings).train()

    def scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Scores ``[B]`` of the chosen and the rejected responses (one forward over both)."""
        return self.model.score(batch["input_ids"], batch["attention_mask"]).chunk(2)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        chosen, rejected = self.scores(batch)
        loss = bradley_terry_loss(chosen, rejected, self.hparams.margin)
        self.train_accuracy.update((chosen > rejected).float())
        self.log("rm/loss", loss, prog_bar=True)
        self.log("rm/accuracy", self.train_accuracy, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        chosen, rejected = self.scores(batch)
        self.val_accuracy.update((chosen > rejected).float())
        self.val_scores.append(torch.cat([chosen, rejected]).detach())
        self.log("val/loss", bradley_terry_loss(chosen, rejected, self.hparams.margin))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.val_scores:
            scores = torch.cat(self.val_scores)
            if scores.numel() > 1:
                self.model.set_normalization(scores.mean().item(), scores.std().clamp_min(1e-6).item())
            self.val_scores.clear()

    def configure_optimizers(self):
        optimizer = make_optimizer(self.optimizer, self.model, default_lr=1e-5)
        return optimizer_with_schedule(optimizer, self.hparams.warmup_steps, self.hparams.lr_decay, self.trainer)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export_pretrained(self.hparams.export_dir)

    def export_pretrained(self, directory: str, merge_lora: bool = True) -> dict[str, str]:
        """Write the reward model (with its score statistics) and tokenizer in Hugging Face format."""
        self.tokenizer.padding_side = "left"
        self.model.save_pretrained(directory, merge_lora=merge_lora, tokenizer=self.tokenizer)
        self.tokenizer.padding_side = "right"
        return {"reward": directory}
