"""Where and how a VLLMEngine starts: its process environment, its tensor-parallel group, and what
vLLM's CPU build supports. Nothing here imports vLLM at module import time."""

from __future__ import annotations

import contextlib
import logging
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


def shard_group(tensor_parallel_size: int, device: torch.device) -> ShardGroup:
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
    local = (
        device.index if device.type == "cuda" and device.index is not None else int(os.environ.get("LOCAL_RANK", rank))
    )
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


def scheduler_args(
    max_num_seqs: int,
    max_num_batched_tokens: int | None,
    enable_chunked_prefill: bool | None,
    max_model_len: int | None,
    cuda: bool,
) -> dict[str, Any]:
    """vLLM's scheduler arguments. Every request is seeded (one seed per row), and on CPU vLLM cannot
    rewind a seeded request's generator after a step that computed only part of its prompt
    (``gpu_model_runner`` calls ``Generator.set_offset``, CUDA-only), so the engine would die as soon as
    one step's token budget ends inside a prompt: chunked prefill is off on CPU, and every step then
    takes whole prompts only (vLLM keeps the budget at least ``max_model_len``)."""
    chunked = cuda if enable_chunked_prefill is None else enable_chunked_prefill
    if not chunked and max_num_batched_tokens is not None and max_model_len and max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"rollout.engine.init_args.max_num_batched_tokens={max_num_batched_tokens} is less than max_model_len "
            f"{max_model_len}: without chunked prefill one step must hold a whole prompt; raise it, lower "
            "max_model_len, or leave it null"
        )
    args: dict[str, Any] = {"max_num_seqs": max_num_seqs}
    if enable_chunked_prefill is not None or not cuda:
        args["enable_chunked_prefill"] = chunked
    if max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = max_num_batched_tokens
    return args


class _DropChatWarmup(logging.Filter):
    """vLLM's ``LLM`` renders a chat template once at start-up to warm it up; the engine is token-in,
    token-out (no chat, and no tokenizer unless stop strings need one), so its failure is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Chat template warmup failed"


@contextlib.contextmanager
def quiet_chat_warmup() -> Iterator[None]:
    """Drop the chat-template warm-up's warning (a ``Tokenizer not available`` traceback) while an engine starts."""
    logger, drop = logging.getLogger("vllm.renderers.base"), _DropChatWarmup()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def engine_death(error: BaseException, llm: Any, rows: int, prompt_tokens: int) -> RuntimeError | None:
    """An error that says what to change when vLLM's engine died (``EngineDeadError``), else None."""
    if type(error).__name__ != "EngineDeadError":
        return None
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    return RuntimeError(
        f"rollout.engine: the vLLM engine died while generating {rows} rows ({prompt_tokens} prompt tokens) with "
        f"max_num_seqs={scheduler.max_num_seqs}, max_num_batched_tokens={scheduler.max_num_batched_tokens}, "
        f"enable_chunked_prefill={scheduler.enable_chunked_prefill}; the cause is in the EngineCore traceback above. "
        "'CPU Generator does not use offset': a seeded prompt was split over steps, set "
        "rollout.engine.init_args.enable_chunked_prefill: false (the CPU default); out of memory: lower "
        "rollout.engine.init_args.max_num_seqs or max_num_batched_tokens, or raise kv_cache_gib"
    )
