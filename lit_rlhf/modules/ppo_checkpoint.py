"""PPOModule's state beyond weights (seeds, RNG, KL controller), sharding, and Hugging Face export."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger

from lit_rlhf.checkpoints import add_digest, verify_digest
from lit_rlhf.models.policy_set import drop_frozen, restore_frozen
from lit_rlhf.models.sharding import is_sharded
from lit_rlhf.modules.outputs import replaced_directory
from lit_rlhf.rewards import RewardModel

REWARD_PREFIX = "rewards."  # reward models: frozen, reloaded from their paths
IN_FLIGHT_KEY = "rollout_in_flight"  # the asynchronous rollouts' rows in flight, one entry per rank


def run_seed() -> int:
    """The run's seed, as ``seed_everything`` (the config's ``seed_everything``) set it."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def rng_states() -> dict:
    """Torch (CPU, CUDA) and Python RNG states, in types that load with ``weights_only=True``."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_extras(module, checkpoint: dict) -> None:
    """Drop the frozen models (reloaded from their paths) and add KL controller, RNG and W&B run id.

    A sharded (FSDP2 distributed) checkpoint keeps the frozen shards: distributed loading reads
    the whole model state, and each rank writes only its shard of them.
    """
    if not is_sharded(module.actor.model):
        drop_frozen(checkpoint["state_dict"], frozen_prefixes(module))
    checkpoint["kl_controller"] = module.kl_controller.state_dict()
    in_flight = in_flight_states(module)
    if in_flight is not None:
        checkpoint[IN_FLIGHT_KEY] = in_flight
    checkpoint["rng_states"] = rng_states()
    for logger in module.loggers:
        if isinstance(logger, WandbLogger):
            checkpoint["wandb_run_id"] = logger.experiment.id
    add_digest(checkpoint)


def load_extras(module, checkpoint: dict) -> None:
    """Check the checkpoint's digest, put the freshly loaded frozen weights back into its state dict,
    restore the rest.
    """
    trainer = module._trainer
    verify_digest(checkpoint, getattr(trainer, "ckpt_path", None) if trainer is not None else None)
    state = checkpoint.get("state_dict")
    if isinstance(state, dict) and not is_sharded(module.actor.model):
        restore_frozen(state, module.state_dict(), frozen_prefixes(module))
    if "kl_controller" in checkpoint:
        module.kl_controller.load_state_dict(checkpoint["kl_controller"])
    if "rng_states" in checkpoint:
        set_rng_states(checkpoint["rng_states"])
    if IN_FLIGHT_KEY in checkpoint:  # the runner takes it at fit start, or now if it is built already
        rank = trainer.global_rank if trainer is not None else 0
        states = checkpoint[IN_FLIGHT_KEY]
        if trainer is not None and len(states) != trainer.world_size:
            raise RuntimeError(
                f"the checkpoint holds the in-flight rollout rows of {len(states)} ranks, this run has "
                f"{trainer.world_size}: an asynchronous run resumes on as many ranks as it was saved from"
            )
        module.resumed_in_flight = states[rank]
        if module.runner is not None:  # FSDP2 (ModelParallelStrategy) restores after on_fit_start built it
            module.runner.load_in_flight_state(states[rank])


def in_flight_states(module) -> list | None:
    """Every rank's in-flight asynchronous rollout rows (``RolloutRunner.in_flight_state``), gathered, or
    None in a synchronous run. Called on every rank (each holds its own rows)."""
    runner = module.runner
    state = None if runner is None else runner.in_flight_state()
    if state is None:
        return None
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return [state]
    import torch.distributed as dist

    states: list = [None] * trainer.world_size
    dist.all_gather_object(states, state)
    return states


def frozen_prefixes(module) -> tuple[str, ...]:
    return (*module.policy.frozen_prefixes, REWARD_PREFIX)


def shard_models(module, mesh: Any, precision: str | None) -> None:
    """FSDP2 over the data-parallel mesh: every model, trainable and frozen, sharded per decoder layer."""
    reward_models = [c.model for c in module.rewards if isinstance(c, RewardModel) and c.model is not None]
    module.policy.shard(mesh, precision, scored=tuple(reward_models))


def export_models(module, directory: str, merge_lora: bool = True) -> dict[str, str]:
    """Write actor (and critic) as single Hugging Face checkpoints; under FSDP2 all ranks must call it
    (the full weights are gathered collectively) and rank 0 writes.
    """
    trainer = module._trainer
    writer = trainer is None or trainer.is_global_zero
    names = ["actor"] + (["critic"] if module.critic is not None else [])
    # written whole or not at all: a failed export leaves a previous one in ``directory`` as it was
    target = replaced_directory(directory, "ppo", module) if writer else contextlib.nullcontext(directory)
    with target as partial:
        module.policy.write({name: f"{partial}/{name}" for name in names}, writer, merge_lora)
    return {name: f"{directory}/{name}" for name in names}
