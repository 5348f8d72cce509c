"""SFTModule: supervised fine-tuning on (prompt, response) pairs, loss on response tokens only."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_rlhf.data.sft import IGNORE_INDEX
from lit_rlhf.models import Actor, LoadSettings, LoraSettings, load_tokenizer
from lit_rlhf.models.loading import AttnImplementation, DType
from lit_rlhf.modules.schedule import make_optimizer, optimizer_with_schedule


class SFTModule(L.LightningModule):
    """Causal-LM fine-tuning with the prompt tokens masked out of the loss.

    Args:
        model_path: the model to fine-tune (local directory or hub id).
        optimizer: optimizer (None = AdamW, lr 2e-5).
        warmup_steps: linear learning-rate warm-up steps.
        lr_decay: ``constant`` or ``cosine`` (to 0 at the end of training) after warm-up.
        dtype: weights dtype.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (gpu extra).
        lora_rank: LoRA rank (0 = full fine-tuning).
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        gradient_checkpointing: recompute activations in the backward pass.
        export_dir: where ``on_train_end`` writes the Hugging Face checkpoint (None = nowhere).
    """

    def __init__(
        self,
        model_path: str,
        optimizer: OptimizerCallable | None = None,
        warmup_steps: int = 0,
        lr_decay: Literal["constant", "cosine"] = "cosine",
        dtype: DType = "float32",
        attn_implementation: AttnImplementation = "sdpa",
        lora_rank: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        self.tokenizer = load_tokenizer(model_path, padding_side="right")
        self.actor: Actor | None = None

    def configure_model(self) -> None:
        if self.actor is not None:
            return
        hp = self.hparams
        settings = LoadSettings(
            hp.dtype,
            hp.attn_implementation,
            LoraSettings(hp.lora_rank, hp.lora_alpha, hp.lora_dropout),
            gradient_checkpointing=hp.gradient_checkpointing,
        )
        self.actor = Actor.from_pretrained(hp.model_path, self.tokenizer, settings).train()

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over response tokens and their next-token accuracy."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if "position_ids" not in inputs:
            inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        logits = self.actor.model(**inputs, use_cache=False).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[valid].float(), labels[valid])
        accuracy = (logits[valid].argmax(-1) == labels[valid]).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, accuracy = self.loss(batch)
        self.log_dict({"sft/loss": loss, "sft/token_accuracy": accuracy}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, accuracy = self.loss(batch)
        self.log_dict({"val/loss": loss, "val/token_accuracy": accuracy}, prog_bar=True)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.optimizer, self.actor, default_lr=2e-5)
        return optimizer_with_schedule(optimizer, self.hparams.warmup_steps, self.hparams.lr_decay, self.trainer)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export_pretrained(self.hparams.export_dir)

    def export_pretrained(self, directory: str, merge_lora: bool = True) -> dict[str, str]:
        """Write the fine-tuned model (LoRA merged unless ``merge_lora=False``) with its tokenizer."""
        self.tokenizer.padding_side = "left"
        self.actor.save_pretrained(directory, merge_lora=merge_lora, tokenizer=self.tokenizer)
        self.tokenizer.padding_side = "right"
        return {"actor": directory}
