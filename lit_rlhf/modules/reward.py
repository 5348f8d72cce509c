"""RewardModelModule: a scalar-head model trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lit_rlhf.models import ValueModel, load_tokenizer
from lit_rlhf.modules.outputs import replaced_directory
from lit_rlhf.modules.single import SingleModelModule
from lit_rlhf.settings import ModelSettings, OptimizerSettings


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0) -> Tensor:
    """``-log sigmoid(r_chosen - r_rejected - margin)``, averaged over pairs."""
    return -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()


class RewardModelModule(SingleModelModule):
    """Reward-model training: ``score(chosen)`` should exceed ``score(rejected)``.

    The exported checkpoint is a ``*ForSequenceClassification`` model that PPO loads as its reward
    model (``lit_rlhf.rewards.RewardModel``) and critic initialisation; it stores the mean/std of
    its scores on the validation pairs for ``RewardModel(normalize=true)``.

    Args:
        models: initialisation (``path``; an SFT causal LM gets a new scalar head) and how it is loaded.
        optim: optimiser (None = AdamW, lr 1e-5), warm-up/decay schedule and gradient clipping.
        margin: Bradley-Terry margin (the score gap below which a pair still has loss).
        export_dir: where ``on_train_end`` writes the Hugging Face checkpoint (None = ``export/`` in the run
            directory).
    """

    export_kind = "reward"

    def __init__(
        self,
        models: ModelSettings,
        optim: OptimizerSettings = OptimizerSettings(),
        margin: float = 0.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(models, optim, export_dir, default_lr=1e-5, extra_hparams={"margin": margin})
        self.margin = margin
        self.tokenizer = load_tokenizer(self.models.path, padding_side="right")
        self.model: ValueModel | None = None
        self.train_accuracy, self.val_accuracy = MeanMetric(), MeanMetric()
        self.val_scores: list[Tensor] = []

    def configure_model(self) -> None:
        if self.model is None:
            # training a reward model from an SFT policy starts its score head at random: that is the job
            self.model = ValueModel.from_pretrained(self.models.path, self.models, "models.path", True).train()
            self.trained = self.model

    def scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Scores ``[B]`` of the chosen and the rejected responses (one forward over both)."""
        return self.model.score(batch["input_ids"], batch["attention_mask"]).chunk(2)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        chosen, rejected = self.scores(batch)
        loss = bradley_terry_loss(chosen, rejected, self.margin)
        self.train_accuracy.update((chosen > rejected).float())
        self.log("rm/loss", loss, prog_bar=True)
        self.log("rm/accuracy", self.train_accuracy, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        chosen, rejected = self.scores(batch)
        self.val_accuracy.update((chosen > rejected).float())
        self.val_scores.append(torch.cat([chosen, rejected]).detach())
        self.log("val/loss", bradley_terry_loss(chosen, rejected, self.margin))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.val_scores:
            scores = torch.cat(self.val_scores)
            if scores.numel() > 1:
                self.model.set_normalization(scores.mean().item(), scores.std().clamp_min(1e-6).item())
            self.val_scores.clear()

    def export_pretrained(self, directory: str, merge_lora: bool = True) -> dict[str, str]:
        """Write the reward model (with its score statistics) and tokenizer in Hugging Face format."""
        self.tokenizer.padding_side = "left"
        with replaced_directory(directory, self.export_kind, self) as partial:  # whole or not at all
            self.model.save_pretrained(partial, merge_lora=merge_lora, tokenizer=self.tokenizer)
        self.tokenizer.padding_side = "right"
        return {"reward": directory}
