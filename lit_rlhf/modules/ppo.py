"""PPOModule: PPO-based RLHF (and GRPO/RLOO/REINFORCE++) as a LightningModule."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from lit_rlhf.models import GenerationOutput, load_tokenizer
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.modules.outputs import check_outputs, export_directory, run_directory
from lit_rlhf.modules.ppo_checkpoint import export_models, load_extras, run_seed, save_extras, shard_models
from lit_rlhf.modules.ppo_rollout import build_runner, collect
from lit_rlhf.modules.ppo_setup import (
    build_policy,
    check_critic_head,
    check_ppo_settings,
    check_prompt_lengths,
    check_token_ids,
    check_tokenizers,
    critic_path,
)
from lit_rlhf.modules.ppo_step import DivergenceGuard, grad_norm, last_checkpoint, ppo_micro_step, step_optimizer
from lit_rlhf.modules.ppo_validation import validation_step
from lit_rlhf.modules.sample_logging import SampleLoggingCallback
from lit_rlhf.modules.schedule import make_optimizer, make_scheduler, ppo_total_steps
from lit_rlhf.modules.val_before_train import validate_before_training
from lit_rlhf.quiet import quiet_run
from lit_rlhf.rewards import RewardBatch, RewardComponent, RewardFunction
from lit_rlhf.rewards.base import as_components
from lit_rlhf.rewards.scorer import RewardScorer, Scores
from lit_rlhf.rollout.callback import RolloutCallback
from lit_rlhf.rollout.experience import Experience, ExperienceBuffer
from lit_rlhf.rollout.kl_control import make_kl_controller
from lit_rlhf.rollout.multi_turn.tokens import check_renders_tools
from lit_rlhf.rollout.multi_turn.tools import tool_schema
from lit_rlhf.rollout.runner import Rollout, RolloutRunner
from lit_rlhf.rollout.samples import LastRollout
from lit_rlhf.settings import (
    AlgorithmSettings,
    GenerationSettings,
    KLSettings,
    PPOModelSettings,
    PPOOptimSettings,
    RolloutSettings,
    as_group,
    save_settings,
    to_plain,
)

log = logging.getLogger(__name__)

ACTOR_LR, CRITIC_LR = 1e-6, 1e-5


class PPOModule(L.LightningModule):
    """PPO on a Hugging Face causal LM, with a critic (``gae``) or without (group estimators).

    Settings come in typed groups (``lit_rlhf.settings``); each field's meaning is in its group's
    ``--help``. From Python a group is an instance or a plain ``dict`` of its fields.

    Args:
        models: the actor, critic and reference paths, and how the models are loaded (dtype,
            attention, LoRA, 4-bit, gradient checkpointing, padding-free).
        rewards: reward components (``lit_rlhf.rewards``); the sequence score is their weighted sum.
            May be empty when a subclass overrides ``compute_reward``.
        generation: how responses are sampled.
        rollout: prompts per rollout and scoring micro-batches.
        algorithm: advantage estimator, clipping, batch sizes, PPO epochs and reward shaping.
        kl: the KL penalty to the reference policy (``coef: 0``: a reference-free run, no reference
            model and no reference forwards).
        optim: the actor's and the critic's optimisers, schedules and gradient clipping.
        val_metrics: extra validation metrics, ``name: package.module.function`` with the reward
            signature ``(prompts, responses, **columns) -> Tensor[B]``; logged as ``val/<name>``
            (e.g. a task's exact-match accuracy, which does not depend on the reward model).
        export_dir: where ``on_train_end`` writes the actor and critic as Hugging Face checkpoints
            (None = ``export/`` in the run directory).
        log_samples_every_n_rollouts: log a table of sample responses after rollouts 0, N, 2N, ... to the
            console, ``samples.jsonl`` and W&B (0 = never).
        num_logged_samples: rows in each sample table, spread over the rollout's prompts.
        val_before_train: validate once before the first rollout, so the ``val/`` curves start from
            the starting policy (logged at step 0; a resumed run skips it).
    """

    export_kind = "ppo"  # what export_dir holds: actor/ and critic/

    def __init__(
        self,
        models: PPOModelSettings,
        rewards: list[RewardComponent] | None = None,
        generation: GenerationSettings = GenerationSettings(),
        rollout: RolloutSettings = RolloutSettings(),
        algorithm: AlgorithmSettings = AlgorithmSettings(),
        kl: KLSettings = KLSettings(),
        optim: PPOOptimSettings = PPOOptimSettings(),
        val_metrics: dict[str, str] | None = None,
        export_dir: str | None = None,
        log_samples_every_n_rollouts: int = 1,
        num_logged_samples: int = 8,
        val_before_train: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.models = as_group(PPOModelSettings, models)
        self.generation = as_group(GenerationSettings, generation)
        self.rollout = as_group(RolloutSettings, rollout)
        self.algorithm = as_group(AlgorithmSettings, algorithm)
        self.kl = as_group(KLSettings, kl)
        self.optim = as_group(PPOOptimSettings, optim)
        self.rewards = nn.ModuleList(as_components(rewards))
        check_ppo_settings(
            self.generation, self.rollout, self.algorithm, self.rewards, self._has_custom_reward(), self.models
        )
        for name, value in (
            ("log_samples_every_n_rollouts", log_samples_every_n_rollouts),
            ("num_logged_samples", num_logged_samples),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 = never log samples), got {value}")
        # plain functions, not submodules: validation metrics hold no weights
        self.val_metric_fns = [RewardFunction(fn, name=name) for name, fn in (val_metrics or {}).items()]
        self.export_dir = export_dir
        self.log_samples_every_n_rollouts, self.num_logged_samples = log_samples_every_n_rollouts, num_logged_samples
        self.val_before_train = val_before_train
        save_settings(self, self._plain_settings())
        self.val_generation = self.generation.for_validation()
        self.kl_controller = make_kl_controller(self.kl)
        self.guard = DivergenceGuard(self.optim.max_nonfinite_steps)
        self.tokenizer = load_tokenizer(self.models.actor_path, trust_remote_code=self.models.trust_remote_code)
        custom = self._has_custom_reward()
        self.scorer = RewardScorer(
            self.rewards,
            self.algorithm,
            self.tokenizer,
            custom=self.compute_reward if custom else None,
            custom_name=f"{type(self).__qualname__}.compute_reward",
        )
        size = self.rollout.rollout_batch_size * self.generation.n_samples_per_prompt
        self.buffer = ExperienceBuffer(size, self.algorithm.mini_batch_size, self.algorithm.ppo_epochs)
        self.critic_path = critic_path(self.models, self.rewards)
        if self.algorithm.uses_critic:  # knowable from config.json: before any logger or model starts
            check_critic_head(self.models, self.critic_path)
        check_token_ids(self.generation, self.models)
        if not self.kl.uses_reference:
            log.info(
                "kl.coef=0: a reference-free run: no reference model is loaded and rollout/kl and val/kl are not "
                "logged (set kl.coef > 0 to measure and penalise the KL to the reference)"
            )
            if self.models.reference_path is not None:
                log.warning(
                    "models.reference_path=%r is not loaded: kl.coef=0 puts no KL in the reward or the loss",
                    self.models.reference_path,
                )
        self.actor = self.critic = self.reference = None
        self.policy: PolicySet | None = None  # the model set (configure_model): actor, reference, critic
        self.runner: RolloutRunner | None = None  # built at fit start, once the models are in place
        self.resumed_in_flight: dict | None = None  # a checkpoint's in-flight rollout rows, until the runner takes them
        self._val_turn_loop = None  # a multi-turn run's validation loop, built on first use
        self._started_engine = False
        self.run_dir = "."  # set in setup(): lit-rlhf's <root>/version_<N>
        self.last_rollout: LastRollout | None = None  # set by the RolloutCallback, read by the sample logger
        self._generation_ended: float | None = None  # when the last asynchronous rollout's generation ended
        self.val_reward, self.val_kl = MeanMetric(), MeanMetric()
        self.val_metric_means = nn.ModuleDict({fn.name: MeanMetric() for fn in self.val_metric_fns})

    def _plain_settings(self) -> dict:
        """Every setting as plain data: what checkpoints store and loggers record."""
        groups = ("models", "generation", "rollout", "algorithm", "kl", "optim")
        return {
            **{name: to_plain(getattr(self, name)) for name in groups},
            "rewards": [component.to_config() for component in self.rewards],
            "val_metrics": {fn.name: fn.fn_path for fn in self.val_metric_fns},
            "export_dir": self.export_dir,
            "log_samples_every_n_rollouts": self.log_samples_every_n_rollouts,
            "num_logged_samples": self.num_logged_samples,
            "val_before_train": self.val_before_train,
        }

    # --- models -------------------------------------------------------------------------------

    def _has_custom_reward(self) -> bool:
        return type(self).compute_reward is not PPOModule.compute_reward

    def setup(self, stage: str) -> None:
        """Find the run directory (on every rank), check what can be checked before any model loads,
        and log every optimizer step.
        """
        self.run_dir = run_directory(self.trainer)
        quiet_run(self.trainer)  # what the CLI prints, from Python too
        if stage == "fit":  # writable, and replacing nothing but an earlier PPO export
            check_outputs(self.trainer, self.export_dir, self.run_dir, self.export_kind)
        uses_critic = self.algorithm.uses_critic
        check_tokenizers(self.models, self.tokenizer, self.critic_path if uses_critic else None, self.kl.uses_reference)
        check_prompt_lengths(self.trainer.datamodule, self.models, self.generation.max_new_tokens)
        if self.rollout.multi_turn is not None and self.rollout.multi_turn.tools:  # before any model loads
            tools = [tool_schema(fn) for fn in self.rollout.multi_turn.tool_functions()]
            check_renders_tools(self.tokenizer, tools)
        if self.trainer.log_every_n_steps != 1:
            # a PPO optimizer step is expensive and rare: each one's metrics are worth a line
            log.info("PPO logs every optimizer step: trainer.log_every_n_steps %d -> 1", self.trainer.log_every_n_steps)
            self.trainer.log_every_n_steps = 1

    def configure_model(self) -> None:
        """Load the models (after the datamodule's checks, so bad data fails first)."""
        if self.actor is not None:
            return
        self.policy = build_policy(
            self.models, self.tokenizer, self.algorithm.uses_critic, self.critic_path, self.kl.uses_reference
        )
        # all are submodules so that strategies move (and shard) them; the frozen ones are dropped
        # from checkpoints in on_save_checkpoint and reloaded from their paths
        self.actor, self.critic, self.reference = self.policy.actor.train(), self.policy.critic, self.policy.reference
        if self.critic is not None:
            self.critic.train()  # train mode matters for gradient checkpointing; dropout is off anyway
        self.scorer.setup(self.models)  # a compute_reward override loads the components it calls on first use
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2
            shard_models(self, self._device_mesh, self.trainer.precision)

    # --- rewards ------------------------------------------------------------------------------

    def compute_reward(self, prompts: list[str], responses: list[str], **columns: list) -> Tensor:
        """Sequence rewards ``[B]``: the override point for custom rewards.

        The default is the weighted sum of the ``rewards`` components. An override replaces it and
        may call ``super().compute_reward(prompts, responses, **columns)`` to add to it. Overrides
        get only the dataset columns they accept (all of them with ``**columns``).

        Args:
            prompts: each row's prompt as the policy saw it (chat template applied).
            responses: the decoded responses (special tokens skipped).
            columns: the other fields of each row's prompt record (e.g. ``answer``), one per row, and
                ``prompt_messages``: each row's messages before the chat template (None for plain text).
        """
        return self.reward_sum(RewardBatch(prompts, responses, columns))

    def reward_sum(self, batch: RewardBatch) -> Tensor:
        """``sum(weight * score)`` over the reward components; each one's scores are kept for logging."""
        return self.scorer.reward_sum(batch, self.device, self.models)

    def score_responses(self, gen: GenerationOutput, prompts: list[str], columns: dict[str, list], *turns) -> Scores:
        """Scores of a generation: the reward, then the missing-EOS penalty, then clipping (the scorer's).
        A multi-turn generation passes ``turns``: the final answers, the completions and the
        environments' rewards (``turn_inputs``)."""
        return self.scorer(gen, prompts, columns, *turns)

    def decode_responses(self, gen: GenerationOutput) -> list[str]:
        """Response texts: every response token the rows attend to (special tokens dropped)."""
        return self.scorer.decode(gen)

    @property
    def component_scores(self) -> dict[str, Tensor]:
        """Each reward component's scores of the latest scoring call."""
        return self.scorer.component_scores

    # --- rollouts -----------------------------------------------------------------------------

    def collect_rollout(self, rollout_index: int) -> Rollout:
        """Rollout ``rollout_index`` of this rank (what the ``RolloutCallback`` puts into the buffer):
        this rank's prompts, sampled by the engine with the current weights and scored by the runner;
        the KL controller is updated and the rollout's metrics logged."""
        return collect(self, rollout_index)

    def on_fit_start(self) -> None:
        """Build the rollout runner and start this rank's engine (the models are loaded by now)."""
        self.runner = build_runner(self, run_seed())
        self.runner.load_in_flight_state(self.resumed_in_flight)  # a resumed asynchronous run's rows
        self._started_engine = self.rollout.engine.start(self.actor, self.device)

    def teardown(self, stage: str) -> None:
        if self._started_engine:  # an engine started by its owner stays with its owner
            self.rollout.engine.shutdown()
            self._started_engine = False

    # --- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self):
        """The actor's (and the critic's) optimiser, each with its warm-up/decay schedule per step."""
        parts = [(self.optim.actor, self.actor, ACTOR_LR)]
        if self.critic is not None:
            parts.append((self.optim.critic, self.critic, CRITIC_LR))
        total = ppo_total_steps(self.trainer.max_epochs, self.trainer.max_steps, len(self.buffer), len(parts))
        optimizers, schedulers = [], []
        for settings, model, default_lr in parts:
            optimizer = make_optimizer(settings.optimizer, model, default_lr)
            optimizers.append(optimizer)
            schedulers.append(make_scheduler(optimizer, settings, total))
        return optimizers, schedulers

    def train_dataloader(self) -> DataLoader:
        """Index mini-batches into the experience buffer (see ``ExperienceBuffer``).

        The order is drawn from the epoch the trainer is in when the iterator is built, which is
        also right after a resume.
        """
        self.buffer.seed = run_seed()
        self.buffer.set_rollout(lambda: self.current_epoch)
        return DataLoader(self.buffer, batch_size=None)

    def training_step(self, indices: Tensor, batch_idx: int) -> None:
        batch = self.buffer.get(indices)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        local_tokens = batch.loss_mask.sum()
        # gradients are averaged over ranks, so dividing by the mean token count per rank makes the
        # update the token mean over the whole (global) mini-batch
        mean_tokens = self.trainer.strategy.reduce(local_tokens.float(), reduce_op="mean")
        stats: dict[str, Tensor] = {}
        for micro in self.micro_batches(batch):
            tokens = micro.loss_mask.sum()
            loss, micro_stats = ppo_micro_step(
                self.actor,
                self.critic,
                micro,
                self.algorithm,
                self.kl,
                self.kl_controller.value,
                self.generation.scoring_temperature,
            )
            self.manual_backward(loss * tokens / mean_tokens)
            for key, value in micro_stats.items():
                stats[key] = stats.get(key, 0.0) + value * tokens / local_tokens
        self.update(optimizers, stats, f"rollout {self.current_epoch}, mini-batch {batch_idx}")
        self.log_dict(stats, on_step=True, on_epoch=False)

    def micro_batches(self, batch: Experience) -> list[Experience]:
        """A mini-batch's micro-batches: rows of similar length together, as many on every rank."""
        size, tokens = self.algorithm.micro_batch_size, self.algorithm.micro_batch_tokens
        micro = batch.micro_batches(size, tokens)
        count = int(self.trainer.strategy.reduce(torch.tensor(len(micro), device=self.device), reduce_op="max"))
        return batch.micro_batches(size, tokens, count) if count != len(micro) else micro

    def update(self, optimizers: list, stats: dict[str, Tensor], where: str) -> None:
        """Clip and step the actor's (and critic's) optimizer and schedule, unless the divergence guard skips."""
        parts = [("policy", self.actor, self.optim.actor)]
        if self.critic is not None:
            parts.append(("critic", self.critic, self.optim.critic))
        for name, model, _ in parts:
            stats[f"{name}/grad_norm"] = grad_norm(model)  # before clipping
        checked = {k: v for k, v in stats.items() if k.endswith(("/loss", "/grad_norm"))}
        reduce_sum = lambda x: self.trainer.strategy.reduce(x, reduce_op="sum")  # noqa: E731
        if self.guard.allows(checked, where, last_checkpoint(self.trainer), reduce_sum):
            schedulers = self.lr_schedulers()
            schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
            for (name, model, settings), optimizer, scheduler in zip(parts, optimizers, schedulers, strict=True):
                step_optimizer(optimizer, model, settings.max_grad_norm, stats[f"{name}/grad_norm"])
                stats[f"{name}/lr"] = torch.tensor(scheduler.get_last_lr()[0])
                scheduler.step()
        else:  # drop the gradients: weights, optimizer state and schedule stay as they were
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        stats["policy/skipped_steps"] = torch.tensor(float(self.guard.skipped))

    # --- validation ---------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        validation_step(self, batch, batch_idx)

    def on_train_start(self) -> None:
        if self.val_before_train:
            validate_before_training(self.trainer)

    def on_train_end(self) -> None:
        self.export_pretrained(export_directory(self.export_dir, self.run_dir))

    # --- checkpoints and export ---------------------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        """The rollout callback and, after it, the sample logger come with the module (configured ones are replaced)."""
        samples = SampleLoggingCallback(self.log_samples_every_n_rollouts, self.num_logged_samples)
        return [RolloutCallback(), samples]

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
