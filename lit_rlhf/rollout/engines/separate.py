"""SeparateEngine: an engine in a process of its own, on devices of its own.

The trainer starts it with the actor (its architecture, tokenizer and first weights are written once to
a temporary folder the process loads), pushes the actor's weights after every update over a
``torch.distributed`` process group of two (the trainer's process and the engine's: gloo on CPU, nccl
on GPUs) in buckets of whole tensors (an FSDP2 actor's shards gathered one tensor at a time), and
talks to it over a pipe. A generation can be submitted and collected later (``submit`` / ``collect``),
so with ``rollout.asynchronous`` the engine generates rollout k+1 while the trainer trains on rollout
k: one step off-policy, every token's version accounted for.

The process serves its messages in order: a generation submitted before a push is sampled entirely
with the weights it was submitted under (the engine finishes it before it loads the push), one
submitted after with the new ones; nothing is ever sampled with half a push. With ``max_staleness`` η
the trainer keeps η rollouts submitted ahead.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import socket
import tempfile
import time
import traceback
from typing import Any

import torch

from lit_rlhf.rollout.engines.base import GenerationRequest, OnToken, RolloutEngine, Sample

NATIVE = "lit_rlhf.rollout.engines.native.NativeEngine"
TIMEOUT = datetime.timedelta(minutes=30)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def weight_group(port: int, rank: int, backend: str):
    """The trainer's (rank 0) and the engine's (rank 1) process group, apart from any training group."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=TIMEOUT)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, 2)
    return dist.ProcessGroupGloo(store, rank, 2, TIMEOUT)


class SeparateEngine(RolloutEngine):
    """Run ``engine`` (a dotted class path; the native sampler by default) in a process of its own on
    ``device`` and push the actor's weights to it over ``backend`` (None: nccl for a CUDA device, else
    gloo) in buckets of at most ``bucket_mib`` MiB.

    ``rollout.engine: {class_path: lit_rlhf.rollout.SeparateEngine, init_args: {device: cuda:1}}``; with
    ``rollout.asynchronous`` (``max_staleness`` η >= 1, ``carry_over: false``) it generates η rollouts ahead.
    """

    recomputes_old_log_probs = True
    samples_with_actor = False
    generates_ahead = True

    def __init__(
        self,
        engine: str = NATIVE,
        engine_args: dict | None = None,
        device: str = "cpu",
        backend: str | None = None,
        bucket_mib: int = 64,
    ) -> None:
        self.engine, self.engine_args, self.device = engine, dict(engine_args or {}), device
        self.backend = backend or ("nccl" if str(device).startswith("cuda") else "gloo")
        self.bucket_mib = bucket_mib
        self.process = self.conn = self.group = None
        self.pushes = 0  # weight versions pushed (the engine's version)
        self.in_flight = 0  # submitted generations not collected yet (the process serves them in order)
        self._done: collections.deque = collections.deque()  # finished ones read while waiting for a push
        self.last_push: dict[str, float] = {}
        self._model_dir: tempfile.TemporaryDirectory | None = None

    def __repr__(self) -> str:
        return f"SeparateEngine(engine={self.engine!r}, device={self.device!r}, backend={self.backend!r})"

    def init_args(self) -> dict:
        return {
            "engine": self.engine,
            "engine_args": self.engine_args,
            "device": self.device,
            "backend": self.backend,
            "bucket_mib": self.bucket_mib,
        }

    def start(self, actor: Any, device: Any) -> bool:
        if self.process is not None:
            return False
        from lit_rlhf.models.sharding import hf_model

        # the architecture and the tokenizer only (an FSDP2 actor is sharded by now): the weights arrive
        # with the first push, before anything is sampled
        self._model_dir = tempfile.TemporaryDirectory(prefix="lit-rlhf-engine-")
        path = self._model_dir.name
        model = hf_model(actor.model)
        model.config.save_pretrained(path)
        if getattr(actor, "tokenizer", None) is not None:
            actor.tokenizer.save_pretrained(path)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        ids = ([int(i) for i in actor.eos_token_ids.tolist()], int(actor.pad_token_id), dtype)
        context = torch.multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        port = free_port()
        args = (child, path, ids, self.engine, self.engine_args, self.device, port, self.backend)
        # not a daemon: an engine such as vLLM starts processes of its own; the process ends when the pipe closes
        self.process = context.Process(target=serve, args=args)
        self.process.start()
        self.group = weight_group(port, 0, self.backend)
        self._reply("started")
        return True

    def sync_weights(self, actor: Any) -> None:
        """Push the actor's weights in buckets. The process serves messages in order: generations submitted
        before the push are sampled with the weights they were submitted under, later ones with these."""
        from lit_rlhf.models.sharding import policy_weights

        start, limit = time.perf_counter(), self.bucket_mib * 2**20
        device = torch.device(self.device) if self.backend == "nccl" else torch.device("cpu")
        buckets: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = total = 0
        for name, tensor in policy_weights(actor.model):
            tensor = tensor.detach()
            bucket = buckets[-1]
            if bucket and (size >= limit or bucket[-1][1].dtype != tensor.dtype):
                self._push(bucket, device)
                buckets.append([])
                size = 0
            buckets[-1].append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            total += tensor.numel() * tensor.element_size()
        if buckets[-1]:
            self._push(buckets[-1], device)
        self.conn.send(("commit",))
        self.pushes = self._reply("loaded")
        self.last_push = {"seconds": time.perf_counter() - start, "bytes": float(total), "buckets": len(buckets)}

    def _push(self, bucket: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
        meta = [(name, tuple(t.shape)) for name, t in bucket]
        self.conn.send(("bucket", meta, str(bucket[0][1].dtype).removeprefix("torch.")))
        flat = torch.cat([t.reshape(-1).to(device) for _, t in bucket])  # one bucket at a time in memory
        self.group.send([flat], 1, 0).wait()

    def submit(self, requests: list[GenerationRequest], generation: Any) -> None:
        """Queue ``requests`` for the engine's process; :meth:`collect` returns the samples, first in first out."""
        self.conn.send(("generate", list(requests), generation))
        self.in_flight += 1

    def collect(self) -> tuple[list[Sample], int, float]:
        """The submitted generation's samples, the weight version (pushes) that sampled them, and the
        seconds the engine spent generating them."""
        if not self.in_flight:
            raise RuntimeError("SeparateEngine.collect without a submitted generation")
        self.in_flight -= 1
        samples, version, seconds = self._done.popleft() if self._done else self._reply("samples")
        return samples, version, seconds

    def generate(
        self, requests: list[GenerationRequest], generation: Any, on_token: OnToken | None = None
    ) -> list[Sample]:
        self.submit(requests, generation)
        return self.collect()[0]

    def _reply(self, kind: str):
        """The process's next message of ``kind``; finished generations that come first are kept for collect."""
        while True:
            try:
                message = self.conn.recv()
            except EOFError as error:
                code = self.process.exitcode if self.process is not None else None
                raise RuntimeError(f"the SeparateEngine process ended unexpectedly (exit code {code})") from error
            if message[0] == "error":
                raise RuntimeError(f"the SeparateEngine process failed:\n{message[1]}")
            if message[0] == kind:
                return message[1] if len(message) == 2 else message[1:]
            if message[0] != "samples":
                raise RuntimeError(f"the SeparateEngine process answered {message[0]!r} where {kind!r} was due")
            self._done.append(message[1:])

    def shutdown(self) -> None:
        if self.process is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(("stop",))
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()
        self.process = self.conn = self.group = None
        self.in_flight = 0
        self._done.clear()
        if self._model_dir is not None:
            self._model_dir.cleanup()
            self._model_dir = None


def serve(
    conn, path: str, ids: tuple, engine_path: str, engine_args: dict, device: str, port: int, backend: str
) -> None:
    """The engine's process: build the actor from the architecture in ``path`` (``ids``: its EOS ids, pad
    id and dtype), start the engine, then serve the trainer's messages in order (weight buckets and
    their commit, a generation, stop)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from lit_rlhf.models import Actor, load_tokenizer
        from lit_rlhf.plain_data import import_object

        eos_ids, pad_id, dtype = ids
        tokenizer = load_tokenizer(path) if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else None
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
        actor = Actor(model, eos_ids, pad_id, tokenizer=tokenizer).to(device)
        actor.eval()
        engine = import_object(engine_path, "rollout.engine.init_args.engine")(**engine_args)
        engine.start(actor, device)
        group = weight_group(port, 1, backend)
        params = dict(actor.model.named_parameters())
        receive_on = torch.device(device) if backend == "nccl" else torch.device("cpu")
        version = 0
        conn.send(("started", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the trainer is gone
            engine.shutdown()
            return
        try:
            if message[0] == "stop":
                engine.shutdown()
                return
            if message[0] == "bucket":
                _, meta, dtype = message
                count = sum(_numel(shape) for _, shape in meta)
                flat = torch.empty(count, dtype=getattr(torch, dtype), device=receive_on)
                group.recv([flat], 0, 0).wait()
                offset = 0
                with torch.no_grad():
                    for name, shape in meta:
                        n = _numel(shape)
                        params[name].copy_(flat[offset : offset + n].view(shape))
                        offset += n
            elif message[0] == "commit":  # every bucket of this push arrived
                version += 1
                engine.sync_weights(actor)
                conn.send(("loaded", version))
            elif message[0] == "generate":
                _, requests, generation = message
                start = time.perf_counter()
                with torch.no_grad():
                    samples = engine.generate(requests, generation)
                conn.send(("samples", samples, version, time.perf_counter() - start))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
