"""The PPO module's rollout: its runner, the prompts of rollout k, and the rollout's metrics."""

from __future__ import annotations

import contextlib
import time

import lightning as L
import torch

from lit_rlhf.rollout.progress import PhaseProgress
from lit_rlhf.rollout.runner import Rollout, RolloutRunner
from lit_rlhf.rollout.samples import LastRollout

PROGRESS_BAR_METRICS = ("reward/mean", "rollout/kl")


def build_runner(module, seed: int) -> RolloutRunner:
    """The module's runner: its models, engine, scorer and settings, reducing over the trainer's ranks."""
    trainer = module.trainer
    return RolloutRunner(
        module.policy,
        module.rollout.engine,
        module.scorer,
        generation=module.generation,
        rollout=module.rollout,
        algorithm=module.algorithm,
        kl=module.kl,
        kl_coef=module.kl_controller,  # the live coefficient, read at every rollout
        seed=seed,
        rank=trainer.global_rank,
        all_reduce=_reduce(trainer, "sum"),
        reduce_max=_reduce(trainer, "max"),
    )


def collect(module, rollout_index: int) -> Rollout:
    """Rollout ``rollout_index`` of this rank: prompts, weights pushed to the engine, sample, score;
    then the KL controller's update and the rollout's metrics."""
    trainer = module.trainer
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "rollout_prompts"):
        raise RuntimeError("PPO needs a PromptDataModule (data: in the config) to draw rollout prompts from")
    device, rank, world = module.device, trainer.global_rank, trainer.world_size
    asynchronous = module.rollout.is_asynchronous

    def on_device(batch: dict) -> dict:
        on = {name: batch[name].to(device) for name in ("input_ids", "attention_mask")}
        return {**batch, **on}

    def prompts_at(positions: list[int], count: bool = True) -> dict:  # this rank's prompt stream
        return on_device(datamodule.stream_prompts(positions, rank, world, count))

    def slice_of(rollout: int) -> dict:  # this rank's prompts of rollout ``rollout`` (a synchronous run's)
        return on_device(datamodule.rollout_prompts(rollout, module.rollout.rollout_batch_size, rank, world))

    engine = module.rollout.engine
    ahead = asynchronous and getattr(engine, "generates_ahead", False)  # one step off-policy
    # carry-over draws its prompts from the stream as groups finish (its first one is the weight check's)
    batch = prompts_at([0], count=False) if asynchronous and not ahead else slice_of(rollout_index)
    progress = PhaseProgress(trainer)
    pushed: dict[str, float] = {}

    def push() -> None:  # the engine gets the weights of the last optimizer step, then the weight check
        start = time.perf_counter()
        engine.sync_weights(module.actor)
        if not engine.samples_with_actor:
            pushed["sync_s"] = time.perf_counter() - start
            if module.rollout.weight_check_tolerance is not None:  # raises when the engine's weights are stale
                pushed["checked"] = module.runner.check_weights(batch)

    with fsdp1_full_params(trainer):
        carried = None
        if ahead:
            rollout, carried = module.runner.collect_ahead(rollout_index, slice_of, push, progress)
        else:
            push()
        generation_start = time.perf_counter()
        if asynchronous and not ahead:
            rollout, carried = module.runner.collect_async(rollout_index, prompts_at, progress)
            batch = carried.prompts
        elif not ahead:
            rollout = module.runner.collect(rollout_index, batch, progress)
    sync_s, checked = pushed.get("sync_s"), pushed.get("checked")
    progress.training()
    metrics = module.runner.metrics(rollout, carried)
    metrics["rollout/kl_coef"] = torch.tensor(module.kl_controller.value)
    if "rollout/kl" in metrics:  # a reference-free run has no KL (and kl.coef stays 0)
        module.kl_controller.update(float(metrics["rollout/kl"]), len(rollout.experience) * trainer.world_size)
    timing = rollout.timing
    metrics.update(
        {
            "perf/rollout": torch.tensor(float(rollout_index)),
            "perf/generation_s": torch.tensor(timing["generation_s"]),
            "perf/scoring_s": torch.tensor(timing["scoring_s"]),
            "perf/generation_tokens_per_s": torch.tensor(
                timing["generated_tokens"] / max(timing["generation_s"], 1e-9)
            ),
            "rollout/prompts_truncated": batch["num_truncated"].float(),
        }
    )
    if sync_s is not None:
        metrics["perf/weight_sync_s"] = torch.tensor(sync_s)
        timing["weight_sync_s"] = sync_s
    if checked is not None:
        metrics["rollout/weight_check_logprob_diff"] = torch.tensor(checked)
    if ahead:  # the trainer waited for the engine's samples; the engine for the trainer's next submission
        metrics["perf/trainer_idle_s"] = torch.tensor(carried.counts["trainer_idle_s"])
        metrics["perf/generator_idle_s"] = torch.tensor(carried.counts["generator_idle_s"])
    elif asynchronous:  # colocated: the trainer waits while the engine generates, and the engine while it trains
        last_end = module._generation_ended
        metrics["perf/trainer_idle_s"] = torch.tensor(timing["generation_s"])
        metrics["perf/generator_idle_s"] = torch.tensor(0.0 if last_end is None else generation_start - last_end)
        metrics["perf/decode_steps"] = torch.tensor(carried.counts["decode_steps"])
        module._generation_ended = generation_start + timing["generation_s"]
    for key, value in metrics.items():
        # already reduced over ranks; sync_dist makes Lightning average identical values (no warning)
        module.log(key, value, on_step=False, on_epoch=True, prog_bar=key in PROGRESS_BAR_METRICS, sync_dist=True)
    # what the SampleLoggingCallback reads next
    module.last_rollout = LastRollout(
        rollout_index,
        rollout.experience,
        rollout.reward_parts,
        batch["prompts"],
        batch["columns"],
        rollout.trajectories,
    )
    return rollout


def fsdp1_full_params(trainer: L.Trainer):
    """Under Lightning's ``FSDPStrategy`` (FSDP1) gather all weights once for the whole rollout.

    FSDP2 (``ModelParallelStrategy``) gathers only the actor, in the runner's ``sample``.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=True)


def _reduce(trainer: L.Trainer, op: str):
    """Sum or maximum across ranks (identity in one process)."""
    if trainer.world_size == 1:
        return lambda x: x
    return lambda x: trainer.strategy.reduce(x, reduce_op=op)
