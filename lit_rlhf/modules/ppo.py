"""PPOModule: PPO-based RLHF (and GRPO/RLOO/REINFORCE++) as a LightningModule."""

from __future__ import annotations

import dataclasses
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from lit_rlhf.functional import KLEstimator
from lit_rlhf.models import GenerationOutput, GenerationSettings, load_tokenizer
from lit_rlhf.models.loading import AttnImplementation, DType
from lit_rlhf.modules.ppo_checkpoint import export_models, load_extras, run_seed, save_extras, shard_models
from lit_rlhf.modules.ppo_setup import build_models, validate_settings
from lit_rlhf.modules.ppo_step import PPOLossWeights, ppo_micro_step, step_optimizer
from lit_rlhf.modules.schedule import cosine_with_warmup, make_optimizer
from lit_rlhf.rollout.advantages import CRITIC_FREE, AdvantageEstimator, AdvantageSettings
from lit_rlhf.rollout.callback import RolloutCallback
from lit_rlhf.rollout.experience import ExperienceBuffer
from lit_rlhf.rollout.kl_control import AdaptiveKLController, KLController
from lit_rlhf.rollout.maker import RolloutSettings, ends_with_eos, in_micro_batches, reference_log_probs
from lit_rlhf.rollout.rewards import call_reward, check_scores, import_reward_fn

ACTOR_LR, CRITIC_LR = 1e-6, 1e-5


class PPOModule(L.LightningModule):
    """PPO on a Hugging Face causal LM, with a critic (``gae``) or without (group estimators).

    Args:
        actor_path: the policy to train (SFT checkpoint): local directory or hub id.
        reward_path: reward model (``*ForSequenceClassification`` or causal LM); None when the reward
            comes from ``reward_fn`` or a ``compute_reward`` override.
        critic_path: critic initialisation; default ``reward_path``, else ``actor_path`` (new head).
        reference_path: reference policy; default ``actor_path`` (or, with LoRA, the actor with its
            adapter disabled, so no second copy is held).
        reward_fn: ``package.module.function`` taking ``(prompts, responses)`` and returning ``Tensor[B]``.
        max_new_tokens: response length limit.
        temperature: sampling temperature; log-probs use the same one.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: top-k sampling (0 = off).
        n_samples_per_prompt: responses per prompt (contiguous groups for group estimators).
        suppress_token_ids: token ids never sampled (e.g. pad/bos, or EOS for fixed-length responses).
        val_temperature: validation sampling temperature (None = ``temperature``; 0 = greedy).
        advantage_estimator: ``gae`` (critic), or critic-free ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``.
        clip_eps: PPO ratio clip.
        clip_eps_high: upper ratio clip (None = ``clip_eps``).
        dual_clip: dual-clip bound c > 1 for negative advantages (None = off).
        value_clip_eps: value clip around the rollout's values (None = unclipped value loss).
        gamma: discount.
        lam: GAE lambda.
        entropy_coef: weight of the entropy bonus.
        kl_coef: KL coefficient beta (initial value when adaptive).
        kl_estimator: ``k1``, ``k2`` or ``k3``; the KL put in the reward or the loss and logged.
        kl_penalty: ``reward`` (per-token penalty in the reward) or ``loss`` (added to the policy loss).
        kl_target: target KL per sequence for the adaptive controller (None = fixed coefficient).
        kl_horizon: adaptive controller horizon in samples.
        whiten_advantages: whiten advantages over the rollout (None = on, except for ``grpo`` whose
            advantages are already normalised).
        normalize_reward: apply the reward model's stored mean/std to its scores.
        reward_clip: clamp scores to ``[-reward_clip, reward_clip]`` (None = off).
        missing_eos_penalty: subtracted from the score of responses cut at ``max_new_tokens``.
        rollout_batch_size: prompts per rollout on each rank.
        score_micro_batch_size: rows per scoring forward in the rollout.
        mini_batch_size: experiences per optimizer step (on each rank).
        micro_batch_size: experiences per forward/backward; gradients accumulate to a mini-batch.
        ppo_epochs: passes over each rollout's experiences.
        actor_optimizer: optimizer for the actor's trainable parameters (None = AdamW, lr 1e-6).
        critic_optimizer: optimizer for the critic's trainable parameters (None = AdamW, lr 1e-5).
        warmup_updates: linear learning-rate warm-up, in optimizer steps.
        lr_decay: ``constant`` or ``cosine`` (to 0 over the run) after warm-up.
        actor_max_grad_norm: actor gradient clipping (None = off).
        critic_max_grad_norm: critic gradient clipping (None = off).
        dtype: weights dtype of all models.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (gpu extra).
        lora_rank: LoRA rank for actor and critic (0 = full fine-tuning).
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_target_modules: modules that get adapters (``all-linear`` or a list of names).
        load_in_4bit: load base weights in 4-bit NF4 (gpu extra; needs LoRA).
        gradient_checkpointing: recompute activations in the backward pass.
        padding_free: pack the rows of every scoring and training forward into one row without
            padding (position ids restart per row). Pays off with ``flash_attention_2`` (varlen
            kernels); with ``sdpa``/``eager`` attention runs over the packed length with a
            block-diagonal mask, so leave it off there. Columns that are padding in every row are
            skipped either way.
        recompute_old_log_probs: compute the rollout's old log-probs with a separate full forward
            instead of reusing the sampler's (same within float tolerance; one more forward pass).
        gather_for_generation: under FSDP2, gather the actor's full weights once per rollout for
            generation (one extra full copy of the actor per rank while generating) instead of
            all-gathering every layer for every generated token (slow, but no extra memory).
        log_samples_every_n_epochs: log a table of sample generations every N rollouts (0 = never).
        num_logged_samples: rows in each sample table.
        val_metrics: extra validation metrics, ``name: package.module.function`` with the reward
            signature ``(prompts, responses) -> Tensor[B]``; logged as ``val/<name>`` (e.g. a task's
            exact-match accuracy, which does not depend on the reward model).
        export_dir: where ``on_train_end`` writes the actor and critic as Hugging Face checkpoints.
    """

    def __init__(
        self,
        actor_path: str,
        reward_path: str | None = None,
        critic_path: str | None = None,
        reference_path: str | None = None,
        reward_fn: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        n_samples_per_prompt: int = 1,
        suppress_token_ids: list[int] | None = None,
        val_temperature: float | None = None,
        advantage_estimator: AdvantageEstimator = "gae",
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        value_clip_eps: float | None = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "k1",
        kl_penalty: Literal["reward", "loss"] = "reward",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        whiten_advantages: bool | None = None,
        normalize_reward: bool = False,
        reward_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        rollout_batch_size: int = 64,
        score_micro_batch_size: int = 16,
        mini_batch_size: int = 64,
        micro_batch_size: int = 16,
        ppo_epochs: int = 1,
        actor_optimizer: OptimizerCallable | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        warmup_updates: int = 0,
        lr_decay: Literal["constant", "cosine"] = "constant",
        actor_max_grad_norm: float | None = 1.0,
        critic_max_grad_norm: float | None = 1.0,
        dtype: DType = "float32",
        attn_implementation: AttnImplementation = "sdpa",
        lora_rank: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "all-linear",
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        padding_free: bool = False,
        gather_for_generation: bool = True,
        recompute_old_log_probs: bool = False,
        log_samples_every_n_epochs: int = 1,
        num_logged_samples: int = 8,
        val_metrics: dict[str, str] | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["actor_optimizer", "critic_optimizer"])
        self.automatic_optimization = False
        self.actor_optimizer, self.critic_optimizer = actor_optimizer, critic_optimizer
        self.uses_critic = advantage_estimator not in CRITIC_FREE
        validate_settings(self.hparams, custom_reward=self._has_custom_reward())
        self.reward_fn = import_reward_fn(reward_fn) if reward_fn else None
        self.val_metric_fns = {name: import_reward_fn(path) for name, path in (val_metrics or {}).items()}
        suppress = tuple(suppress_token_ids or ())
        self.generation = GenerationSettings(max_new_tokens, temperature, top_p, top_k, suppress_token_ids=suppress)
        self.val_generation = dataclasses.replace(
            self.generation, temperature=temperature if val_temperature is None else val_temperature
        )
        whiten = advantage_estimator != "grpo" if whiten_advantages is None else whiten_advantages
        self.rollout_settings = RolloutSettings(
            generation=self.generation,
            advantages=AdvantageSettings(
                advantage_estimator, gamma, lam, kl_estimator, kl_penalty == "reward", whiten, n_samples_per_prompt
            ),
            n_samples_per_prompt=n_samples_per_prompt,
            micro_batch_size=score_micro_batch_size,
            gather_for_generation=gather_for_generation,
            recompute_old_log_probs=recompute_old_log_probs,
        )
        self.loss_weights = PPOLossWeights(
            clip_eps, clip_eps_high, dual_clip, value_clip_eps, entropy_coef, kl_estimator, kl_penalty == "loss"
        )
        self.kl_controller = (
            KLController(kl_coef) if kl_target is None else AdaptiveKLController(kl_coef, kl_target, kl_horizon)
        )
        self.tokenizer = load_tokenizer(actor_path)
        self.buffer = ExperienceBuffer(rollout_batch_size * n_samples_per_prompt, mini_batch_size, ppo_epochs)
        self.actor = self.critic = self.reference = self.reward_model = None
        self.reward_tokenizer, self.reward_shares_tokenizer = None, False
        self.val_reward, self.val_kl = MeanMetric(), MeanMetric()
        self.val_metric_means = torch.nn.ModuleDict({name: MeanMetric() for name in self.val_metric_fns})

    # --- models -------------------------------------------------------------------------------

    def _has_custom_reward(self) -> bool:
        return type(self).compute_reward is not PPOModule.compute_reward

    def configure_model(self) -> None:
        """Load the four models (after the datamodule's checks, so bad data fails first)."""
        if self.actor is not None:
            return
        models = build_models(self.hparams, self.uses_critic, need_reward_model=self._needs_reward_model())
        # all four are submodules so that strategies move (and shard) them; the frozen ones are
        # dropped from checkpoints in on_save_checkpoint and reloaded from their paths
        self.actor, self.critic, self.reference = models.actor.train(), models.critic, models.reference
        if self.critic is not None:
            self.critic.train()  # train mode matters for gradient checkpointing; dropout is off anyway
        self.reward_model, self.reward_tokenizer = models.reward_model, models.reward_tokenizer
        self.reward_shares_tokenizer = models.reward_shares_tokenizer
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2
            shard_models(self, self._device_mesh, self.trainer.precision)

    def _needs_reward_model(self) -> bool:
        return self.reward_fn is None and not self._has_custom_reward()

    # --- rewards ------------------------------------------------------------------------------

    def compute_reward(self, prompts: list[str], responses: list[str]) -> Tensor:
        """Sequence rewards ``[B]`` for decoded prompts and responses: the override point.

        The default scores ``prompt + response`` (+ EOS) with the frozen reward model, re-tokenised
        with the reward model's own tokenizer.
        """
        tok = self.reward_tokenizer
        texts = [p + r + (tok.eos_token or "") for p, r in zip(prompts, responses, strict=True)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return self.reward_model.score(enc.input_ids, enc.attention_mask, normalize=self.hparams.normalize_reward)

    def score_responses(self, gen: GenerationOutput, prompt_len: int) -> Tensor:
        """Scores ``[B]`` of a generation: reward, then missing-EOS penalty, then clipping."""
        hp = self.hparams
        if self._needs_reward_model() and self.reward_shares_tokenizer:
            # same vocabulary: score the token ids directly, no decode/re-tokenise round trip
            scores = in_micro_batches(
                lambda s, m: self.reward_model.score(s, m, normalize=hp.normalize_reward),
                gen,
                hp.score_micro_batch_size,
            )
            scores = check_scores(scores, "reward model", len(scores), lambda i: self.decode_row(gen, prompt_len, i))
        else:
            prompts, responses = self.decode(gen, prompt_len)
            fn, name = (self.reward_fn, hp.reward_fn) if self.reward_fn else (self.compute_reward, self._reward_name())
            scores = call_reward(fn, name, prompts, responses, self.device)
        if hp.missing_eos_penalty is not None:
            has_eos = ends_with_eos(gen.sequences, gen.action_mask, self.actor.eos_token_ids)
            scores = torch.where(has_eos, scores, scores - hp.missing_eos_penalty)
        if hp.reward_clip is not None:
            scores = scores.clamp(-hp.reward_clip, hp.reward_clip)
        return scores

    def _reward_name(self) -> str:
        return f"{type(self).__qualname__}.compute_reward"

    def decode_row(self, gen: GenerationOutput, prompt_len: int, row: int) -> tuple[str, str]:
        """Prompt and response text of one row (for error messages)."""
        prompts, responses = self.decode(
            gen._replace(sequences=gen.sequences[row : row + 1], action_mask=gen.action_mask[row : row + 1]), prompt_len
        )
        return prompts[0], responses[0]

    def decode(self, gen: GenerationOutput, prompt_len: int) -> tuple[list[str], list[str]]:
        """Prompt and response texts (special tokens dropped; responses end at their first EOS)."""
        prompts = self.tokenizer.batch_decode(gen.sequences[:, :prompt_len], skip_special_tokens=True)
        responses = gen.sequences[:, prompt_len:].masked_fill(~gen.action_mask, self.tokenizer.pad_token_id)
        return prompts, self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    # --- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self):
        optimizers = [make_optimizer(self.actor_optimizer, self.actor, ACTOR_LR)]
        if self.uses_critic:
            optimizers.append(make_optimizer(self.critic_optimizer, self.critic, CRITIC_LR))
        total = self.trainer.max_epochs * len(self.buffer) if self.trainer.max_epochs else None
        schedule = cosine_with_warmup(self.hparams.warmup_updates, self.hparams.lr_decay, total)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]
        return optimizers, schedulers

    def train_dataloader(self) -> DataLoader:
        """Index mini-batches into the experience buffer (see ``ExperienceBuffer``).

        The order is drawn from the epoch the trainer is in when the iterator is built, which is
        also right after a resume.
        """
        self.buffer.seed = run_seed()
        self.buffer.set_epoch(lambda: self.current_epoch)
        return DataLoader(self.buffer, batch_size=None)

    def training_step(self, indices: Tensor) -> None:
        batch = self.buffer.get(indices)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        local_tokens = batch.action_mask.sum()
        # gradients are averaged over ranks, so dividing by the mean token count per rank makes the
        # update the token mean over the whole (global) mini-batch
        mean_tokens = self.trainer.strategy.reduce(local_tokens.float(), reduce_op="mean")
        stats: dict[str, Tensor] = {}
        for micro in batch.split(self.hparams.micro_batch_size):
            tokens = micro.action_mask.sum()
            loss, micro_stats = ppo_micro_step(
                self.actor,
                self.critic if self.uses_critic else None,
                micro,
                self.loss_weights,
                self.kl_controller.value,
                self.generation.scoring_temperature,
            )
            self.manual_backward(loss * tokens / mean_tokens)
            for key, value in micro_stats.items():
                stats[key] = stats.get(key, 0.0) + value * tokens / local_tokens
        stats["policy/grad_norm"] = step_optimizer(optimizers[0], self.actor, self.hparams.actor_max_grad_norm)
        if self.uses_critic:
            stats["critic/grad_norm"] = step_optimizer(optimizers[1], self.critic, self.hparams.critic_max_grad_norm)
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        for name, scheduler in zip(("policy", "critic"), schedulers, strict=False):
            stats[f"{name}/lr"] = torch.tensor(scheduler.get_last_lr()[0])
            scheduler.step()
        self.log_dict(stats, on_step=True, on_epoch=False)

    # --- validation ---------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(10_007 + batch_idx)
        gen = self.actor.generate(batch["input_ids"], batch["attention_mask"], self.val_generation, generator)
        prompt_len, num_actions = batch["input_ids"].shape[1], gen.action_mask.shape[1]
        self.val_reward.update(self.score_responses(gen, prompt_len))
        self.log("val/reward", self.val_reward, on_epoch=True, prog_bar=True)
        ref_log_probs = reference_log_probs(
            self.actor,
            self.reference,
            gen.sequences,
            gen.attention_mask,
            num_actions,
            self.val_generation.scoring_temperature,
        )  # the policy's own log-probs come from the sampler: no second actor forward
        self.val_kl.update(torch.where(gen.action_mask, gen.log_probs - ref_log_probs, 0.0).sum(-1))
        self.log("val/kl", self.val_kl, on_epoch=True)
        if self.val_metric_fns:
            prompts, responses = self.decode(gen, prompt_len)
            for name, fn in self.val_metric_fns.items():
                self.val_metric_means[name].update(call_reward(fn, name, prompts, responses, self.device))
                self.log(f"val/{name}", self.val_metric_means[name], on_epoch=True, prog_bar=True)

    def on_train_end(self) -> None:
        if self.hparams.export_dir:
            self.export_pretrained(self.hparams.export_dir)

    # --- checkpoints and export ---------------------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        """The rollout callback always comes with the module (a configured one is replaced)."""
        return [RolloutCallback(seed=run_seed())]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_extras(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        load_extras(self, checkpoint)

    def export_pretrained(self, directory: str, merge_lora: bool = True) -> dict[str, str]:
        """Write the actor (``actor/``) and critic (``critic/``) as Hugging Face checkpoints.

        Under FSDP2 every rank must call this (the full weights are gathered); rank 0 writes.
        """
        return export_models(self, directory, merge_lora)
