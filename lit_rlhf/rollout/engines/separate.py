"""SeparateEngine: an engine in a process of its own, on devices of its own.

The trainer starts it with the actor (its architecture, tokenizer and first weights are written once to
a temporary folder the process loads), pushes the actor's weights after every update over a
``torch.distributed`` process group of two (the trainer's process and the engine's: gloo on CPU, nccl
on GPUs) in buckets of whole tensors (an FSDP2 actor's shards gathered one tensor at a time), and
talks to it over a pipe. A generation can be submitted and collected later (``submit`` / ``collect``),
so with ``rollout.asynchronous`` the engine generates rollout k+1 while the trainer trains on rollout
k: one step off-policy, every token's version accounted for.

The process serves its messages in order, and never samples with half a push: a push that arrives
while a generation decodes pauses it between two decoding steps (``pause_for_push``, engines that report
their steps: the native sampler), loads, and the unfinished rows go on with the new weights, their keys
and values prefilled again; every token is returned with the version that sampled it. Without pausing
(or with an engine that cannot pause, like vLLM's offline engine) a generation submitted before a push
is sampled entirely with the weights it was submitted under. With ``max_staleness`` η the trainer
keeps η rollouts submitted ahead.
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
    gloo) in buckets of at most ``bucket_mib`` MiB. ``pause_for_push``: a push pauses the generations in
    flight and they go on with its weights (False: it waits until they finish, and a run is reproducible
    to the bit whatever the timing).

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
        pause_for_push: bool = True,
    ) -> None:
        self.engine, self.engine_args, self.device = engine, dict(engine_args or {}), device
        self.backend = backend or ("nccl" if str(device).startswith("cuda") else "gloo")
        self.bucket_mib, self.pause_for_push = bucket_mib, pause_for_push
        self.process = self.conn = self.group = None
        self.pushes = 0  # weight versions pushed (the engine's version)
        self._tickets = 0
        self._order: collections.deque = collections.deque()  # submitted generations not collected, in order
        self._done: dict[int, tuple] = {}  # finished ones read while waiting for something else
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
            "pause_for_push": self.pause_for_push,
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
        args = (child, path, ids, self.engine, self.engine_args, self.device, port, self.backend, self.pause_for_push)
        # not a daemon: an engine such as vLLM starts processes of its own; the process ends when the pipe closes
        self.process = context.Process(target=serve, args=args)
        self.process.start()
        self.group = weight_group(port, 0, self.backend)
        self._reply("started")
        return True

    def sync_weights(self, actor: Any) -> None:
        """Push the actor's weights in buckets; a generation in flight pauses for them (``pause_for_push``),
        or finishes with the weights it was submitted under first."""
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

    @property
    def in_flight(self) -> int:
        """Submitted generations not collected yet."""
        return len(self._order)

    def submit(self, requests: list[GenerationRequest], generation: Any) -> int:
        """Queue ``requests`` for the engine's process; :meth:`collect` returns the samples, first in first
        out. Returns the generation's ticket."""
        self._tickets += 1
        self.conn.send(("generate", self._tickets, list(requests), generation))
        self._order.append(self._tickets)
        return self._tickets

    def collect(self) -> tuple[list[Sample], list[tuple[int, ...]], float]:
        """The oldest submitted generation's samples, the weight version (pushes loaded) that sampled each
        of their tokens, and the seconds the engine spent generating them."""
        if not self._order:
            raise RuntimeError("SeparateEngine.collect without a submitted generation")
        return self._wait(self._order.popleft())

    def generate(
        self, requests: list[GenerationRequest], generation: Any, on_token: OnToken | None = None
    ) -> list[Sample]:
        """Samples of ``requests``, after the generations submitted before them (which stay to collect)."""
        ticket = self.submit(requests, generation)
        self._order.remove(ticket)
        return self._wait(ticket)[0]

    def _wait(self, ticket: int) -> tuple:
        while ticket not in self._done:
            self._reply("samples")
        return self._done.pop(ticket)

    def _reply(self, kind: str):
        """The process's next message of ``kind``; finished generations that come first are kept."""
        while True:
            try:
                message = self.conn.recv()
            except EOFError as error:
                code = self.process.exitcode if self.process is not None else None
                raise RuntimeError(f"the SeparateEngine process ended unexpectedly (exit code {code})") from error
            if message[0] == "error":
                raise RuntimeError(f"the SeparateEngine process failed:\n{message[1]}")
            if message[0] == "samples":
                self._done[message[1]] = message[2:]
                if kind == "samples":
                    return None
                continue
            if message[0] == kind:
                return message[1] if len(message) == 2 else message[1:]
            raise RuntimeError(f"the SeparateEngine process answered {message[0]!r} where {kind!r} was due")

    def shutdown(self) -> None:
        if self.process is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(("stop",))
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()
        self.process = self.conn = self.group = None
        self._order.clear()
        self._done.clear()
        if self._model_dir is not None:
            self._model_dir.cleanup()
            self._model_dir = None


class Server:
    """The engine's process: builds the actor from the architecture in ``path`` (``ids``: its EOS ids,
    pad id and dtype), starts the engine, then serves the trainer's messages in order (weight buckets
    and their commit, a generation, stop). With ``pause_for_push`` a push that arrives while a
    generation decodes pauses it at the next decoding step (engines that report their steps through
    ``on_token``, like the native sampler): the push is loaded, and the unfinished rows go on as
    continuations (prompt + kept tokens, their keys and values prefilled again with the new weights)."""

    def __init__(self, conn, path, ids, engine_path, engine_args, device, port, backend, pause_for_push) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from lit_rlhf.models import Actor, load_tokenizer
        from lit_rlhf.plain_data import import_object

        eos_ids, pad_id, dtype = ids
        tokenizer = load_tokenizer(path) if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else None
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
        self.actor = Actor(model, eos_ids, pad_id, tokenizer=tokenizer).to(device)
        self.actor.eval()
        self.engine = import_object(engine_path, "rollout.engine.init_args.engine")(**engine_args)
        self.engine.start(self.actor, device)
        self.conn, self.pause_for_push = conn, pause_for_push
        self.group = weight_group(port, 1, backend)
        self.params = dict(self.actor.model.named_parameters())
        self.receive_on = torch.device(device) if backend == "nccl" else torch.device("cpu")
        self.version = 0  # pushes loaded
        self.inbox: collections.deque = collections.deque()  # messages read during a generation, not served yet
        self.push: tuple | None = None  # a push's first bucket, read during a generation
        self.stopped = False  # the trainer stopped the engine during a generation

    def serve(self) -> None:
        while True:
            try:
                message = self.inbox.popleft() if self.inbox else self.conn.recv()
            except EOFError:  # the trainer is gone
                return
            try:
                if message[0] == "stop":
                    return
                if message[0] == "generate":
                    _, ticket, requests, generation = message
                    start = time.perf_counter()
                    samples, versions = self.generate(requests, generation)
                    if self.stopped:
                        return
                    self.conn.send(("samples", ticket, samples, versions, time.perf_counter() - start))
                else:
                    self.load(message)
            except Exception:
                self.conn.send(("error", traceback.format_exc()))

    def load(self, message: tuple) -> None:
        """Serve a push's messages from ``message`` (a bucket) to its commit."""
        while True:
            if message[0] == "commit":  # every bucket of this push arrived
                self.version += 1
                self.engine.sync_weights(self.actor)
                self.conn.send(("loaded", self.version))
                return
            if message[0] != "bucket":
                raise RuntimeError(f"the SeparateEngine process got {message[0]!r} within a weight push")
            _, meta, dtype = message
            flat = torch.empty(
                sum(_numel(shape) for _, shape in meta), dtype=getattr(torch, dtype), device=self.receive_on
            )
            self.group.recv([flat], 0, 0).wait()
            offset = 0
            with torch.no_grad():
                for name, shape in meta:
                    n = _numel(shape)
                    self.params[name].copy_(flat[offset : offset + n].view(shape))
                    offset += n
            message = self.conn.recv()

    def _pause(self, done: int, total: int) -> bool:
        """``on_token``: read what arrived; True (stop decoding now) once a push has begun or the trainer
        stops the engine (then the generation is abandoned)."""
        while self.push is None and not self.stopped and self.conn.poll():
            try:
                message = self.conn.recv()
            except EOFError:  # the trainer is gone
                message = ("stop",)
            if message[0] == "bucket":
                self.push = message
            elif message[0] == "stop":
                self.stopped = True
            else:
                self.inbox.append(message)
        return self.push is not None or self.stopped

    @torch.no_grad()
    def generate(self, requests: list, generation) -> tuple[list, list]:
        """Samples of ``requests`` and each token's version; a push that arrives meanwhile is loaded
        between two decoding steps, and the unfinished rows go on with its weights (continuations, as
        carry-over continues its rows)."""
        from lit_rlhf.models.stop_strings import StopStrings
        from lit_rlhf.rollout.carry_over import Row, continuation, extend

        first_stop = None
        if generation.stop_strings and self.actor.tokenizer is not None:
            first_stop = StopStrings(self.actor.tokenizer, generation.stop_strings).first_stop
        rows = [Row(list(r.prompt_ids), r.seed) for r in requests]
        budgets = [r.max_new_tokens or generation.max_new_tokens for r in requests]
        live = list(range(len(requests)))
        while live:
            left = {i: budgets[i] - len(rows[i].token_ids) for i in live}
            calls = [continuation(rows[i], requests[i].stop_token_ids, left[i]) for i in live]
            samples = self.engine.generate(calls, generation, self._pause if self.pause_for_push else None)
            if self.stopped:  # abandoned
                return [], []
            paused = self.push is not None
            for i, sample in zip(live, samples, strict=True):
                extend(rows[i], sample, self.version, budgets[i], first_stop)
                if rows[i].finish_reason is None and not paused:  # an engine that stopped short by itself
                    rows[i].finish_reason = "length"
            live = [i for i in live if rows[i].finish_reason is None]
            if paused:
                message, self.push = self.push, None
                self.load(message)
        return [row.sample() for row in rows], [tuple(row.versions) for row in rows]


def serve(conn, *args) -> None:
    """The engine's process (``Server``); the process ends when the trainer stops it or its pipe closes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        server = Server(conn, *args)
        conn.send(("started", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        server.serve()
    finally:
        server.engine.shutdown()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
