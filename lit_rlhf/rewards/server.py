"""``lit-rlhf serve-reward``: a reward model (or a reward function) over HTTP, with LitServe.

lit-rlhf serve-reward --reward_path DIR [--host 127.0.0.1 --port 8000]
lit-rlhf serve-reward --reward_fn package.module.function [--port 8000]

``POST /predict`` with ``{"prompts": [...], "responses": [...], "columns": {name: [...]}}`` answers
``{"rewards": [...]}``; ``GET /health`` answers ``ok`` once the model is loaded. Concurrent requests
are batched (up to ``--max_batch_size`` requests, waiting at most ``--batch_timeout`` seconds),
and the rows of a batch are scored in micro-batches. ``RemoteReward`` is the matching client.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import litserve as ls
from fastapi import HTTPException

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


class RewardAPI(ls.LitAPI):
    """LitServe API scoring requests with one reward component.

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

    def setup(self, device: str) -> None:
        self.device = device
        self.reward.ensure_setup(None, self.load)  # no actor tokenizer: a reward model reads text
        self.reward.to(device)

    def decode_request(self, request) -> dict:  # untyped: LitServe then passes the parsed JSON body
        return parse_request(request)

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def predict(self, requests: dict | list[dict]) -> list[list[float]] | list[float]:
        batched = isinstance(requests, list)
        requests = requests if batched else [requests]
        try:
            scores = score_components([self.reward], merge(requests), self.device)[self.reward.name].tolist()
        except RewardError as err:
            log.error("%s", err)
            raise HTTPException(500, str(err)) from err
        out, start = [], 0
        for request in requests:
            out.append(scores[start : start + len(request["prompts"])])
            start += len(request["prompts"])
        return out if batched else out[0]

    def unbatch(self, output: list[list[float]]) -> list[list[float]]:
        return output

    def encode_response(self, rewards: list[float]) -> dict:
        return {"rewards": rewards}


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


def serve(args: list[str]) -> None:
    """Parse ``args`` and serve until stopped (Ctrl+C or SIGTERM)."""
    known = parser().parse_args(args)
    if known.reward_path is not None:
        reward: RewardComponent = RewardModel(
            known.reward_path, normalize=known.normalize, micro_batch_size=known.micro_batch_size
        )
    else:
        reward = RewardFunction(known.reward_fn)
    api = RewardAPI(reward, LoadSettings(dtype=known.dtype), known.max_batch_size, known.batch_timeout)
    server = ls.LitServer(api, accelerator=known.accelerator, devices=1, workers_per_device=1, timeout=False)
    server.run(host=known.host, port=known.port, generate_client_file=False, num_api_servers=1, log_level="warning")
