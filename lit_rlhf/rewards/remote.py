"""RemoteReward: a reward served over HTTP (``lit-rlhf serve-reward``, or any server of the protocol).

Protocol: ``POST url`` with ``{"prompts": [...], "responses": [...], "columns": {name: [...]}}``,
answered by ``{"rewards": [...]}`` (one float per response). A column that some rows of a request
lack is left out of that request (the server names it as missing, never reads None).
"""

from __future__ import annotations

import asyncio
import json
import time

from lit_rlhf.rewards.base import RewardBatch, RewardComponent, RewardError
from lit_rlhf.rewards.inputs import first_missing


class RemoteReward(RewardComponent):
    """Scores from a reward server, in requests of ``batch_size`` rows sent concurrently.

    Connection errors, read time-outs and 5xx answers are retried with exponential back-off
    (0.5 s, 1 s, 2 s, ...); after the last try the run stops with an error naming the URL. The
    whole call, every request, retry and back-off included, ends within ``timeout_s`` (a server
    that trickles its answer a byte at a time is cut off there too). A reward is never silently
    replaced by a default.

    Args:
        url: the endpoint, e.g. ``http://127.0.0.1:8000/predict``.
        weight: the component's weight in the summed reward.
        timeout_s: seconds the whole call (all the batch's requests, with retries) may take.
        max_retries: further tries after the first failed one.
        batch_size: rows per request.
        name: the name in metrics and errors (default ``remote``).
    """

    def __init__(
        self,
        url: str,
        weight: float = 1.0,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        batch_size: int = 64,
        name: str | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward.url must be an http:// or https:// URL, got {url!r}")
        if timeout_s <= 0 or max_retries < 0 or batch_size < 1:
            raise ValueError(
                "RemoteReward needs timeout_s > 0, max_retries >= 0 and batch_size >= 1, "
                f"got {timeout_s}, {max_retries}, {batch_size}"
            )
        super().__init__(weight, name, timeout_s)
        self.url, self.max_retries, self.batch_size = url, max_retries, batch_size
        self.last_error: str | None = None

    def default_name(self) -> str:
        return "remote"

    def timeout_detail(self) -> str:
        last = f"; last error: {self.last_error}" if self.last_error else ""
        return f" ({self.url} had not answered in full{last})"

    async def score(self, batch: RewardBatch) -> list[float]:
        import httpx

        payloads = []
        for start in range(0, len(batch), self.batch_size):
            rows = slice(start, start + self.batch_size)
            columns = {k: v[rows] for k, v in batch.columns.items()}
            payloads.append(
                {
                    "prompts": batch.prompts[rows],
                    "responses": batch.responses[rows],
                    "columns": {k: v for k, v in columns.items() if first_missing(v) is None},
                }
            )
        self.last_error = None
        deadline = time.monotonic() + self.timeout_s
        # httpx's timeout bounds each read; the component's deadline (score_components) bounds the whole call
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            answers = await asyncio.gather(*(self._post(client, p, deadline) for p in payloads))
        return [reward for answer in answers for reward in answer]

    async def _post(self, client, payload: dict, deadline: float) -> list:
        import httpx

        try:
            body = json.dumps(payload)
        except TypeError as err:
            raise RewardError(f"reward {self.name}: a column cannot be sent as JSON ({err})") from err
        error = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            timeout = max(deadline - time.monotonic(), 1e-3)  # no single read outlasts the whole call
            try:
                answer = await client.post(
                    self.url, content=body, headers={"content-type": "application/json"}, timeout=timeout
                )
            except httpx.HTTPError as err:  # connection refused, reset, time-out
                error = self.last_error = f"{type(err).__name__}: {err}"
                continue
            if answer.status_code >= 500:
                error = self.last_error = f"HTTP {answer.status_code}: {answer.text[:200]}"
                continue
            return self._rewards(answer, len(payload["prompts"]))
        raise RewardError(
            f"reward {self.name}: {self.url} failed after {self.max_retries + 1} tries; last error: {error}"
        )

    def _rewards(self, answer, size: int) -> list:
        if answer.status_code != 200:
            raise RewardError(f"reward {self.name}: {self.url} answered HTTP {answer.status_code}: {answer.text[:200]}")
        try:
            rewards = answer.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            raise RewardError(
                f'reward {self.name}: {self.url} answered {answer.text[:200]!r}; expected {{"rewards": [...]}}'
            ) from None
        if not isinstance(rewards, list) or len(rewards) != size:
            raise RewardError(
                f"reward {self.name}: {self.url} returned {rewards!r:.200}; expected a list of {size} rewards"
            )
        return rewards

    def init_args(self) -> dict:
        return {"url": self.url, "max_retries": self.max_retries, "batch_size": self.batch_size, **super().init_args()}
