"""SFTModule: supervised fine-tuning on (prompt, response) pairs, loss on response tokens only."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.data.sft import IGNORE_INDEX
from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.modules.outputs import replaced_directory
from lit_rlhf.modules.single import SingleModelModule
from lit_rlhf.settings import ModelSettings, OptimizerSettings


class SFTModule(SingleModelModule):
    """Causal-LM fine-tuning with the prompt tokens masked out of the loss.

    Args:
        models: the model to fine-tune (``path``) and how it is loaded (dtype, attention, LoRA, ...).
        optim: optimiser (None = AdamW, lr 2e-5), warm-up/decay schedule and gradient clipping.
        export_dir: where ``on_train_end`` writes the Hugging Face checkpoint (None = ``export/`` in the run
            directory).
    """

    export_kind = "sft"

    def __init__(
        self,
        models: ModelSettings,
        optim: OptimizerSettings = OptimizerSettings(),
        export_dir: str | None = None,
    ) -> None:
        super().__init__(models, optim, export_dir, default_lr=2e-5)
        self.tokenizer = load_tokenizer(self.models.path, padding_side="right")
        self.actor: Actor | None = None

    def configure_model(self) -> None:
        if self.actor is None:
            self.actor = Actor.from_pretrained(
                self.models.path, self.tokenizer, self.models, role="models.path"
            ).train()
            self.trained = self.actor

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

    def export_pretrained(self, directory: str, merge_lora: bool = True) -> dict[str, str]:
        """Write the fine-tuned model (LoRA merged unless ``merge_lora=False``) with its tokenizer."""
        self.tokenizer.padding_side = "left"
        with replaced_directory(directory, self.export_kind, self) as partial:  # whole or not at all
            self.actor.save_pretrained(partial, merge_lora=merge_lora, tokenizer=self.tokenizer)
        self.tokenizer.padding_side = "right"
        return {"actor": directory}
