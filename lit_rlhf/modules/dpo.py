"""DPOModule: direct preference optimisation (DPO, IPO, hinge, SimPO) on preference pairs."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from lit_rlhf import functional as F
from lit_rlhf.checkpoints import add_digest, verify_digest
from lit_rlhf.data.sft import IGNORE_INDEX
from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.models.policy_set import PolicySet, drop_frozen, restore_frozen
from lit_rlhf.models.sharding import is_sharded
from lit_rlhf.modules.dpo_setup import (
    AnswerLogProbs,
    DPOModelSettings,
    DPOSettings,
    ReferenceCache,
    answer_log_probs,
    batch_keys,
    check_dpo_settings,
    pair_key,
    reference_answer_log_probs,
)
from lit_rlhf.modules.outputs import export_directory, replaced_directory
from lit_rlhf.modules.single import SingleModelModule
from lit_rlhf.modules.val_before_train import validate_before_training
from lit_rlhf.modules.validation import sample_validation
from lit_rlhf.rewards import RewardBatch, RewardFunction, score_components
from lit_rlhf.rollout.runner import eval_mode
from lit_rlhf.settings import GenerationSettings, OptimizerSettings, as_group, to_plain

DPO_LR = 1e-6


class DPOModule(SingleModelModule):
    """Direct preference optimisation: the policy learns from (prompt, chosen, rejected) pairs directly,
    with no reward model and no sampling during training.

    The loss compares the policy's log-likelihood margin between the chosen and the rejected answer
    with the frozen reference's (``lit_rlhf.functional.dpo_loss``; ``simpo_loss`` without a reference).
    The exported checkpoint is the policy as a ``*ForCausalLM`` model.

    Args:
        models: the policy (``path``, e.g. your SFT checkpoint), its reference (``reference_path``,
            default the same checkpoint; with LoRA the policy with its adapter disabled) and how they
            are loaded (dtype, attention, LoRA, gradient checkpointing, padding-free).
        algorithm: the preference loss (``loss_type``, ``beta``, ``label_smoothing``,
            ``reference_free`` with ``gamma``) and whether reference log-probs are cached.
        optim: optimiser (None = AdamW, lr 1e-6), warm-up/decay schedule and gradient clipping.
        generation: how validation responses are sampled: one per validation pair's prompt, at
            ``val_temperature`` (None = ``temperature``), for ``val/kl`` and ``val_metrics``.
        val_metrics: held-out metrics of the sampled validation responses, ``name: package.module.function``
            with the reward signature ``(prompts, responses, **columns) -> Tensor[B]``, where the
            columns are the validation record's other fields (e.g. ``answer``); logged as ``val/<name>``.
        export_dir: where ``on_train_end`` writes the policy as a Hugging Face checkpoint (None =
            ``export/`` in the run directory).
        val_before_train: validate once before the first update, so the ``val/`` curves start from
            the starting policy (logged at step 0; a resumed run skips it).
    """

    export_kind = "dpo"

    def __init__(
        self,
        models: DPOModelSettings,
        algorithm: DPOSettings = DPOSettings(),
        optim: OptimizerSettings = OptimizerSettings(),
        generation: GenerationSettings = GenerationSettings(),
        val_metrics: dict[str, str] | None = None,
        export_dir: str | None = None,
        val_before_train: bool = False,
    ) -> None:
        models, algorithm = as_group(DPOModelSettings, models), as_group(DPOSettings, algorithm)
        generation = as_group(GenerationSettings, generation)
        check_dpo_settings(models, algorithm)
        val_metric_fns = [RewardFunction(fn, name=name) for name, fn in (val_metrics or {}).items()]
        extra = {
            "algorithm": to_plain(algorithm),
            "generation": to_plain(generation),
            "val_metrics": {fn.name: fn.fn_path for fn in val_metric_fns},
            "val_before_train": val_before_train,
        }
        super().__init__(models, optim, export_dir, default_lr=DPO_LR, extra_hparams=extra)
        self.algorithm, self.generation = algorithm, generation
        self.val_generation = generation.for_validation()
        self.val_metric_fns = val_metric_fns  # plain functions, not submodules: they hold no weights
        self.val_before_train = val_before_train
        self.tokenizer = load_tokenizer(self.models.path, trust_remote_code=self.models.trust_remote_code)
        self.actor: Actor | None = None
        self.reference: Actor | None = None
        self.policy: PolicySet | None = None  # the model set (configure_model): the policy and its reference
        self.reference_cache = ReferenceCache()
        self.val_columns: dict[bytes, dict] = {}  # a validation pair's rows -> its record's other fields

    # --- models -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)  # checks the export folder before any model loads
        reference = self.models.reference_path
        fix = ": the reference must be a policy with the same tokenizer as models.path (or leave it null)"
        others = {"models.reference_path": (None if reference == self.models.path else reference, fix)}
        PolicySet.check_tokenizers(self.tokenizer, others, self.models.trust_remote_code)

    def configure_model(self) -> None:
        if self.actor is not None:
            return
        self.policy = PolicySet.build(
            self.models,
            self.tokenizer,
            self.models.path,
            actor_role="models.path",
            reference_path=self.models.reference_path,
            uses_reference=not self.algorithm.reference_free,
        )
        self.actor, self.reference = self.policy.actor.train(), self.policy.reference
        self.trained = self.actor
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2
            self.policy.shard(self._device_mesh, self.trainer.precision)

    @property
    def caches_reference(self) -> bool:
        return self.algorithm.caches_reference(separate_reference=self.reference is not None)

    def on_fit_start(self) -> None:
        self.prepare_examples(validation_only=False)

    def on_train_start(self) -> None:
        if self.val_before_train:
            validate_before_training(self.trainer)

    def on_validation_start(self) -> None:
        self.prepare_examples(validation_only=True)  # nothing to do after on_fit_start's

    def prepare_examples(self, validation_only: bool) -> None:
        """Index the validation records by their rows, and fill the reference cache (on every rank)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        val = list(getattr(datamodule, "val_examples", []))
        if not self.val_columns and val:
            prompt_field = datamodule.hparams.get("prompt_field")
            for record, example in zip(datamodule.val_records, val, strict=True):
                self.val_columns[pair_key(example)] = {k: v for k, v in record.items() if k != prompt_field}
        if not self.caches_reference:
            return
        if not hasattr(datamodule, "train_examples"):
            raise ValueError(
                "algorithm.reference_cache needs the examples of a PreferenceDataModule (the trainer's datamodule); "
                "pass one, or set algorithm.reference_cache: false"
            )
        examples = val if validation_only else [*datamodule.train_examples, *val]
        rows = [row for e in examples for row in ((e.chosen_ids, e.chosen_labels), (e.rejected_ids, e.rejected_labels))]
        with eval_mode(self.actor), self.trainer.precision_plugin.forward_context():
            self.reference_cache.fill(
                rows,
                lambda batch: reference_answer_log_probs(self.policy, batch).sums,
                rows_per_forward=2 * datamodule.hparams.batch_size,
                pad_id=self.tokenizer.pad_token_id,
                device=self.device,
                rank=self.global_rank,
                world_size=self.trainer.world_size,
                all_gather=self.all_gather,
            )

    # --- the loss -----------------------------------------------------------------------------

    def preference_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch's mean preference loss and the metrics of its pairs (TRL's names)."""
        policy = answer_log_probs(self.actor, batch)
        settings = self.algorithm
        if settings.reference_free:
            chosen, rejected = policy.chosen_rejected(average=True)
            result = F.simpo_loss(chosen, rejected, settings.beta, settings.gamma, settings.label_smoothing)
        else:
            if self.caches_reference:
                reference = AnswerLogProbs(self.reference_cache.lookup(batch), policy.counts)  # the same tokens
            else:
                reference = reference_answer_log_probs(self.policy, batch)
            average = settings.loss_type == "ipo"  # IPO on per-token averages, as TRL
            chosen, rejected = policy.chosen_rejected(average)
            ref_chosen, ref_rejected = reference.chosen_rejected(average)
            result = F.dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, settings.beta, settings.loss_type, settings.label_smoothing
            )
        loss = result.losses.mean()
        logps_chosen, logps_rejected = policy.sums.detach().chunk(2)
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": result.chosen_rewards.mean(),
            "rewards/rejected": result.rejected_rewards.mean(),
            "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float().mean(),
            "rewards/margins": (result.chosen_rewards - result.rejected_rewards).mean(),
            "logps/chosen": logps_chosen.mean(),
            "logps/rejected": logps_rejected.mean(),
        }
        return loss, metrics

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.preference_loss(batch)
        metrics["dpo/loss"] = metrics.pop("loss")
        self.log_metrics(metrics, batch["input_ids"].shape[0] // 2, sync_dist=False)
        return loss

    def log_metrics(self, metrics: dict[str, Tensor], pairs: int, sync_dist: bool) -> None:
        """Log ``metrics``; the loss and the reward accuracy go to the progress bar too."""
        shown = {k: v for k, v in metrics.items() if k.endswith(("loss", "rewards/accuracies"))}
        rest = {k: v for k, v in metrics.items() if k not in shown}
        self.log_dict(shown, prog_bar=True, batch_size=pairs, sync_dist=sync_dist)
        self.log_dict(rest, batch_size=pairs, sync_dist=sync_dist)

    # --- validation ---------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, metrics = self.preference_loss(batch)
        self.log_metrics({f"val/{k}": v for k, v in metrics.items()}, batch["input_ids"].shape[0] // 2, sync_dist=True)
        # sampled in the weights' dtype: the sampler's static KV cache does not take autocast's bf16 keys
        with torch.autocast(self.device.type, enabled=False):
            self.sample_validation(batch, batch_idx)

    def sample_validation(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Sample a response to each pair's prompt: its KL to the reference and the ``val_metrics``."""
        prompts, prompt_mask = validation_prompts(batch, self.tokenizer.pad_token_id)
        pairs = prompts.shape[0]
        gen, kl = sample_validation(self.policy, prompts, prompt_mask, self.val_generation, batch_idx)
        if kl is not None:
            self.log("val/kl", kl.mean(), batch_size=pairs, sync_dist=True)
        if not self.val_metric_fns:
            return
        responses = self.policy.decode(gen)
        texts = [self.tokenizer.decode(row[mask.bool()]) for row, mask in zip(prompts, prompt_mask, strict=True)]
        keys = batch_keys(batch)
        records = [self.val_columns.get(keys[i] + keys[i + pairs], {}) for i in range(pairs)]
        names = list(dict.fromkeys(name for record in records for name in record))
        columns = {name: [record.get(name) for record in records] for name in names}
        for name, values in score_components(self.val_metric_fns, RewardBatch(texts, responses, columns)).items():
            self.log(f"val/{name}", values.mean(), prog_bar=True, batch_size=pairs, sync_dist=True)

    # --- checkpoints and export ---------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The frozen reference is left out (reloaded from its path), except from sharded checkpoints."""
        if not is_sharded(self.actor.model):
            drop_frozen(checkpoint["state_dict"], self.policy.frozen_prefixes)
        add_digest(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        verify_digest(checkpoint, self.trainer.ckpt_path if self._trainer is not None else None)
        self.configure_model()
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and not is_sharded(self.actor.model):
            restore_frozen(state, self.state_dict(), self.policy.frozen_prefixes)

    def on_train_end(self) -> None:
        self.export_pretrained(export_directory(self.export_dir, self.run_dir))  # every rank: FSDP2 gathers

    def export_pretrained(self, directory: str, merge_lora: bool = True) -> dict[str, str]:
        """Write the policy (LoRA merged unless ``merge_lora=False``) with its tokenizer.

        Under FSDP2 every rank must call this (the full weights are gathered); rank 0 writes.
        """
        writer = self._trainer is None or self.trainer.is_global_zero
        target = replaced_directory(directory, "dpo", self) if writer else contextlib.nullcontext(directory)
        with target as partial:  # whole or not at all
            self.policy.write({"actor": partial}, writer, merge_lora)
        return {"policy": directory}


def validation_prompts(batch: dict[str, Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """The pairs' prompts ``[B, P]``, left-padded, with their attention mask: each chosen row up to its answer."""
    pairs = batch["input_ids"].shape[0] // 2
    ids, answer = batch["input_ids"][:pairs], batch["labels"][:pairs] != IGNORE_INDEX
    starts = answer.long().argmax(-1).tolist()
    width = max(starts)
    prompts = torch.full((pairs, width), pad_id, dtype=torch.long, device=ids.device)
    mask = torch.zeros((pairs, width), dtype=torch.long, device=ids.device)
    for row, start in enumerate(starts):
        prompts[row, width - start :] = ids[row, :start]
        mask[row, width - start :] = 1
    return prompts, mask
