"""RolloutCallback: fills the PPO module's experience buffer at the start of every epoch."""

from __future__ import annotations

import contextlib
import time

import lightning as L
import torch

from lit_rlhf.rollout.maker import RolloutModels, make_experience, mismatch_metrics, rollout_metrics
from lit_rlhf.rollout.progress import PhaseProgress
from lit_rlhf.rollout.samples import LastRollout


class RolloutCallback(L.Callback):
    """One rollout per epoch: this rank's prompts → generate → score → advantages → buffer.

    Every random choice of rollout ``k`` is seeded by ``(seed, k, rank)``, so a resumed run
    regenerates exactly what an uninterrupted one would.

    Args:
        seed: base seed of generation (the run's seed).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.last_timing: dict[str, float] = {}  # the latest rollout's phase seconds (benchmarks read it)
        self._started_engine = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = pl_module.rollout.engine
        if engine != "native":  # this rank's engine, on this rank's device (the models are loaded by now)
            self._started_engine = engine.start(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        engine = pl_module.rollout.engine
        if engine != "native" and self._started_engine:  # an engine started by its owner stays with its owner
            engine.shutdown()
            self._started_engine = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "rollout_prompts"):
            raise RuntimeError("PPO needs a PromptDataModule (data: in the config) to draw rollout prompts from")
        rollout = trainer.current_epoch
        batch = datamodule.rollout_prompts(
            rollout, pl_module.rollout.rollout_batch_size, trainer.global_rank, trainer.world_size
        )
        device = pl_module.device
        generator = torch.Generator(device).manual_seed(self.seed * 1_000_003 + rollout * 1_009 + trainer.global_rank)
        all_reduce = _all_reduce(trainer)
        batch = {
            **batch,
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }
        progress = PhaseProgress(trainer)
        engine = pl_module.rollout.engine
        with fsdp1_full_params(trainer):
            sync_s = None
            if engine != "native":  # the engine generates with the weights of the last optimizer step
                start = time.perf_counter()
                engine.sync_weights(pl_module)
                sync_s = time.perf_counter() - start
            experience, reward_parts, timing = make_experience(
                RolloutModels(pl_module.actor, pl_module.critic, pl_module.reference, pl_module.kl.uses_reference),
                batch,
                pl_module.score_responses,
                generation=pl_module.generation,
                rollout=pl_module.rollout,
                algorithm=pl_module.algorithm,
                kl=pl_module.kl,
                kl_coef=pl_module.kl_controller.value,
                rollout_id=rollout,
                generator=generator,
                all_reduce=all_reduce,
                progress=progress,
                reduce_max=_reduce_max(trainer),
            )
        progress.training()
        pl_module.buffer.fill(experience)
        self.last_timing = timing
        metrics = rollout_metrics(experience, reward_parts, pl_module.actor.eos_token_ids, all_reduce)
        if pl_module.rollout.recomputes_old_log_probs:
            metrics.update(mismatch_metrics(experience, all_reduce, _reduce_max(trainer)))
        metrics["rollout/kl_coef"] = torch.tensor(pl_module.kl_controller.value)
        if "rollout/kl" in metrics:  # a reference-free run has no KL (and kl.coef stays 0)
            pl_module.kl_controller.update(float(metrics["rollout/kl"]), len(experience) * trainer.world_size)
        metrics.update(_perf_metrics(timing, rollout, batch))
        if sync_s is not None:
            metrics["perf/weight_sync_s"] = torch.tensor(sync_s)
            timing["weight_sync_s"] = sync_s
        for key, value in metrics.items():
            # already reduced over ranks; sync_dist makes Lightning average identical values (no warning)
            pl_module.log(
                key, value, on_step=False, on_epoch=True, prog_bar=key in ("reward/mean", "rollout/kl"), sync_dist=True
            )
        # what the SampleLoggingCallback reads next (it logs; this callback only hands over)
        pl_module.last_rollout = LastRollout(rollout, experience, reward_parts, batch["prompts"], batch["columns"])


def _perf_metrics(timing: dict[str, float], rollout: int, batch: dict) -> dict[str, torch.Tensor]:
    return {
        "perf/rollout": torch.tensor(float(rollout)),
        "perf/generation_s": torch.tensor(timing["generation_s"]),
        "perf/scoring_s": torch.tensor(timing["scoring_s"]),
        "perf/generation_tokens_per_s": torch.tensor(timing["generated_tokens"] / max(timing["generation_s"], 1e-9)),
        "rollout/prompts_truncated": batch["num_truncated"].float(),
    }


def fsdp1_full_params(trainer: L.Trainer):
    """Under Lightning's ``FSDPStrategy`` (FSDP1) gather all weights once for the whole rollout.

    FSDP2 (``ModelParallelStrategy``) gathers only the actor, in ``make_experience``.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=True)


def _reduce_max(trainer: L.Trainer):
    """Maximum across ranks (identity in one process)."""
    if trainer.world_size == 1:
        return lambda x: x
    return lambda x: trainer.strategy.reduce(x, reduce_op="max")


def _all_reduce(trainer: L.Trainer):
    """Sum across ranks (identity in one process)."""
    if trainer.world_size == 1:
        return lambda x: x
    return lambda x: trainer.strategy.reduce(x, reduce_op="sum")
