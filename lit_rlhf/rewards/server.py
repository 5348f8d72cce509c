"""``lit-rlhf serve-reward``: a reward model (or a reward function) over HTTP, with LitServe.

lit-rlhf serve-reward --reward_path DIR [--host 127.0.0.1 --port 8000]
lit-rlhf serve-reward --reward_fn package.module.function [--port 8000]

``POST /predict`` with ``{"prompts": [...], "responses": [...], "columns": {name: [...]}}`` answers
``{"rewards": [...]}``; ``GET /health`` answers ``ok`` once the model is loaded. Concurrent requests
are batched (up to ``--max_batch_size`` requests, waiting at most ``--batch_timeout`` seconds),
and the rows of a batch are scored in micro-batches. ``RemoteReward`` is the matching client.

A request it cannot score is answered alone with a 4xx naming the problem, before any model runs:
400 for a body that is not a JSON object of prompts and responses (or has no rows), 413 for a row
longer than the reward model's position range. SIGTERM or SIGINT stops every process it started.
"""

# no ``from __future__ import annotations``: FastAPI reads decode_request's annotation as a real type

import argparse
import logging
import multiprocessing
import os
import signal
import time
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lit_rlhf.rewards.base import RewardBatch, RewardComponent, RewardError, score_components
from lit_rlhf.rewards.function import RewardFunction
from lit_rlhf.rewards.model import RewardModel
from lit_rlhf.settings import LoadSettings

log = logging.getLogger(__name__)


def parse_request(request: Any) -> dict:
    """The request's prompts, responses and columns, checked (an HTTP 400 names what is wrong)."""
    if not isinstance(request, dict):
        raise HTTPException(400, "the body must be a JSON object with prompts, responses and columns")
    prompts, responses = request.get("prompts"), request.get("responses")
    columns = request.get("columns") or {}
    for name, values in (("prompts", prompts), ("responses", responses)):
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise HTTPException(400, f"{name} must be a list of strings")
    if len(prompts) != len(responses):
        raise HTTPException(400, f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise HTTPException(400, "the request has no rows (prompts and responses are empty): send at least one")
    if not isinstance(columns, dict) or not all(
        isinstance(v, list) and len(v) == len(prompts) for v in columns.values()
    ):
        raise HTTPException(400, f"columns must map names to lists of {len(prompts)} values (one per response)")
    return {"prompts": prompts, "responses": responses, "columns": columns}


def merge(requests: list[dict]) -> RewardBatch:
    """One batch of every request's rows; a column missing from a request is None for its rows."""
    names = list(dict.fromkeys(name for request in requests for name in request["columns"]))
    columns = {
        name: [v for r in requests for v in r["columns"].get(name, [None] * len(r["prompts"]))] for name in names
    }
    prompts = [p for r in requests for p in r["prompts"]]
    responses = [p for r in requests for p in r["responses"]]
    return RewardBatch(prompts, responses, columns)


def position_range(reward: RewardComponent) -> int | None:
    """The served reward model's position range (None: a reward function, or a model without one)."""
    if not isinstance(reward, RewardModel):
        return None
    config = getattr(reward.model.model, "config", None)  # the HF model (or peft wrapper) inside the ValueModel
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class RewardAPI(ls.LitAPI):
    """LitServe API scoring requests with one reward component.

    A request that cannot be scored is refused alone: LitServe answers every request of a batch with
    the error of any one of them, so ``decode_request`` returns its ``HTTPException`` instead of
    raising it, ``predict`` scores only the others, and ``encode_response`` answers it with its status.

    Args:
        reward: a ``RewardModel`` (scored from text with its own tokenizer) or a ``RewardFunction``.
        load: how a reward model is loaded (dtype, attention).
        max_batch_size: requests batched into one scoring call.
        batch_timeout: seconds to wait for more requests to fill a batch.
    """

    def __init__(
        self, reward: RewardComponent, load: LoadSettings, max_batch_size: int = 8, batch_timeout: float = 0.01
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.reward, self.load = reward, load
        self.max_tokens: int | None = None

    def setup(self, device: str) -> None:
        self.device = device
        self.reward.ensure_setup(None, self.load)  # no actor tokenizer: a reward model reads text
        self.reward.to(device)
        self.max_tokens = position_range(self.reward)

    def decode_request(self, request: dict) -> dict | HTTPException:  # dict: FastAPI parses the JSON body
        try:
            parsed = parse_request(request)
            self.check_lengths(parsed)
        except HTTPException as err:
            return err
        return parsed

    def check_lengths(self, request: dict) -> None:
        """HTTP 413 for a row longer than the reward model's position range, counted without a forward.

        A longer row would be scored past the positions the model was trained on (a meaningless
        score) after holding the only worker for seconds.
        """
        if self.max_tokens is None:
            return
        tok = self.reward.tokenizer
        pairs = zip(request["prompts"], request["responses"], strict=True)
        texts = [p + r + tok.eos_token for p, r in pairs]  # the text RewardModel.tokenize scores
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        row = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[row] > self.max_tokens:
            raise HTTPException(
                413,
                f"row {row}: prompt + response + EOS are {lengths[row]} tokens, beyond the reward model's position "
                f"range of {self.max_tokens} ({self.reward.path}): send at most {self.max_tokens} tokens per row "
                "(e.g. a lower generation.max_new_tokens) or serve a reward model with a longer range",
            )

    def batch(self, inputs: list[dict | HTTPException]) -> list[dict | HTTPException]:
        return inputs

    def predict(self, requests: Any) -> Any:
        """Scores per request (a list of floats), or the request's own ``HTTPException`` when refused."""
        batched = isinstance(requests, list)
        requests = requests if batched else [requests]
        valid = [r for r in requests if isinstance(r, dict)]
        try:
            scores = score_components([self.reward], merge(valid), self.device)[self.reward.name] if valid else []
        except RewardError as err:
            log.error("%s", err)
            raise HTTPException(500, str(err)) from err
        out, start = [], 0
        for request in requests:
            if isinstance(request, HTTPException):
                out.append(request)
                continue
            out.append([float(v) for v in scores[start : start + len(request["prompts"])]])
            start += len(request["prompts"])
        return out if batched else out[0]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, rewards: Any) -> Any:  # Any: FastAPI passes a JSONResponse through as it is
        if isinstance(rewards, HTTPException):
            return JSONResponse({"detail": rewards.detail}, status_code=rewards.status_code)
        return {"rewards": rewards}


BODY = 'send a JSON object {"prompts": [...], "responses": [...], "columns": {name: [...]}}'


async def refuse_body(request: Request, err: RequestValidationError) -> JSONResponse:
    """HTTP 400 naming why the body is not a JSON object (FastAPI's own answer is a 422 list of dicts)."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        position = first["loc"][-1]
        problem = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')} at byte {position})"
    elif first["type"] == "missing":
        problem = "the body is empty (not valid JSON)"
    else:
        problem = "the body must be a JSON object with prompts, responses and columns"
    return JSONResponse({"detail": f"{problem}: {BODY}"}, status_code=400)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-rlhf serve-reward", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--reward_path", help="reward model directory (*ForSequenceClassification) or hub id")
    source.add_argument("--reward_fn", help="reward function, package.module.function")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--normalize", action="store_true", help="apply the reward model's stored mean/std")
    p.add_argument("--micro_batch_size", type=int, default=16, help="rows per reward-model forward")
    p.add_argument("--max_batch_size", type=int, default=8, help="requests batched into one scoring call")
    p.add_argument("--batch_timeout", type=float, default=0.01, help="seconds to wait to fill a batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    return p


def stop_on_sigterm() -> None:
    """SIGTERM (``kill PID``, a scheduler, Docker) stops the server the way Ctrl+C does.

    Python's default SIGTERM ends this process alone and leaves LitServe's children serving on the
    port; raised as a KeyboardInterrupt instead, it runs LitServe's own shutdown of its workers. A
    forked child inherits the handler (uvicorn re-raises the signal after its own shutdown): it exits.
    """
    parent = os.getpid()

    def handle(signum: int, frame: Any) -> None:
        if os.getpid() != parent:
            raise SystemExit(0)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handle)


def stop_children(timeout_s: float = 5.0) -> None:
    """Terminate, then kill, every process this one started that is still alive: none keeps the port.

    LitServe stops its workers once it serves; a signal while the model loads would leave them.
    """
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.join(max(deadline - time.monotonic(), 0.0))
        if child.is_alive():
            log.warning("reward server worker %s (pid %s) ignored SIGTERM: killed", child.name, child.pid)
            child.kill()
            child.join(1.0)


def serve(args: list[str]) -> None:
    """Parse ``args`` and serve until stopped (Ctrl+C, SIGINT or SIGTERM stop every process it started)."""
    stop_on_sigterm()
    known = parser().parse_args(args)
    if known.reward_path is not None:
        reward: RewardComponent = RewardModel(
            known.reward_path, normalize=known.normalize, micro_batch_size=known.micro_batch_size
        )
    else:
        reward = RewardFunction(known.reward_fn)
    api = RewardAPI(reward, LoadSettings(dtype=known.dtype), known.max_batch_size, known.batch_timeout)
    server = ls.LitServer(api, accelerator=known.accelerator, devices=1, workers_per_device=1, timeout=False)
    server.app.add_exception_handler(RequestValidationError, refuse_body)
    try:
        server.run(host=known.host, port=known.port, generate_client_file=False, num_api_servers=1, log_level="warning")
    except KeyboardInterrupt:
        pass  # stopped while starting; once serving, LitServe handles the signal itself
    finally:
        stop_children()
