"""Where and how a VLLMEngine starts: its process environment, its tensor-parallel group, and what
vLLM's CPU build supports. Nothing here imports vLLM at module import time."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

# what the worker runs besides vLLM's own environment: no torch.compile of sampler helpers on the
# first log-probs request (10-20 s on CPU), and on CPU all cores for the worker (trainer and engine
# take turns, they never compute at the same time)
ENGINE_ENV = {"TORCHDYNAMO_DISABLE": "1"}
CPU_ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# the trainer's launcher variables (torchrun) describe the trainer's process group, not the engine's
LAUNCHER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
)


class ShardGroup(NamedTuple):
    """The ranks that share one tensor-parallel engine, as seen from this rank.

    group: their process group (prompts are gathered over it); rank: this rank's place in it;
    env / engine_args: what vLLM's external launcher needs to start this rank's shard.
    """

    group: Any
    rank: int
    env: dict[str, str]
    engine_args: dict[str, Any]


def shard_group(tensor_parallel_size: int, module: Any) -> ShardGroup:
    """Every ``tensor_parallel_size`` consecutive ranks run one engine, one shard per rank, in the
    trainer's own processes and process group (vLLM's external launcher)."""
    t = tensor_parallel_size
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world % t:
        raise ValueError(
            f"rollout.engine.init_args.tensor_parallel_size={t} splits each engine over {t} ranks, but the "
            f"trainer runs {world} rank(s): set trainer.devices (x num_nodes) to a multiple of {t}, or "
            "tensor_parallel_size: 1"
        )
    rank = torch.distributed.get_rank()
    groups = [torch.distributed.new_group(list(range(g, g + t))) for g in range(0, world, t)]  # on every rank
    device = module.device
    local = device.index if device.type == "cuda" and device.index is not None else module.local_rank
    env = {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world)}
    engine_args = {
        "tensor_parallel_size": t,
        "data_parallel_size": world // t,
        "distributed_executor_backend": "external_launcher",
    }
    return ShardGroup(groups[rank // t], rank % t, env, engine_args)


def spawned_engine_gpu(device: torch.device) -> dict[str, str]:
    """The environment that shows a spawned engine only this rank's GPU."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": visible.split(",")[index] if visible else str(index)}


def check_cpu_head_dim(config) -> None:
    """vLLM's CPU attention supports a fixed set of head sizes; anything else kills the engine mid-rollout."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        return
    if head_dim not in supported:
        raise ValueError(
            f"rollout.engine: vLLM's CPU attention does not support the actor's head size {head_dim} "
            f"(supported: {supported}); use rollout.engine: native for this model"
        )


@contextlib.contextmanager
def environment(values: dict[str, str], remove: tuple[str, ...] = ()) -> Iterator[None]:
    """Set ``values`` (and unset ``remove``) for the engine's processes, spawned inside the block, then
    restore the caller's whole environment (vLLM sets variables such as LD_PRELOAD in its caller)."""
    saved = dict(os.environ)
    for name in remove:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
