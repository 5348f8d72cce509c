"""The ``rollout.asynchronous`` group: rollouts that stop waiting for their slowest rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lit_rlhf.settings.common import _check, _choice

OnStale = Literal["drop", "wait"]


@dataclass(frozen=True, kw_only=True)
class AsyncSettings:
    """Partial rollouts with carry-over and bounded staleness (absent, or ``max_staleness: 0``: the
    synchronous rollout, bit for bit).

    A rollout ends as soon as ``rollout.rollout_batch_size`` prompt groups (all
    ``generation.n_samples_per_prompt`` samples of a prompt) are complete. The rows still decoding are
    stopped and keep their tokens, the log-probs of the policy that sampled them and each token's policy
    version; after the update they resume as continuations (prompt + kept tokens) next to new prompts.
    A token sampled by policy version ``v`` (the weights rollout ``v`` sampled with) and trained in
    rollout ``k`` is ``k - v`` versions stale; no trained token is more than ``max_staleness`` stale.
    Training uses the decoupled PPO loss (``algorithm.rollout_correction: decoupled``).
    """

    max_staleness: int = 1
    """η: how many policy versions a trained token may lag the policy it trains (0 = synchronous)."""
    carry_over: bool = True
    """keep the rows a rollout stopped and resume them in the next one (false: they are dropped,
    which favours short responses; counted in ``rollout/dropped_rows``)."""
    over_provision: int | None = None
    """prompt groups in flight beyond ``rollout_batch_size`` (None: a quarter of it, at least 1); the
    capacity rule (AReaL's) admits new prompts only while the groups in flight stay within
    ``(max_staleness + 1) * rollout_batch_size``."""
    on_stale: OnStale = "wait"
    """a group that must be trained in this rollout or exceed ``max_staleness``: ``wait`` keeps the
    rollout going until it is complete (it is trained first); ``drop`` ends the rollout without it and
    discards it (its prompt is not repeated; counted in ``rollout/dropped_rows``)."""
    segment_tokens: int = 32
    """the engine decodes the live rows this many tokens at a time; between segments the rollout checks
    whether enough groups are complete (smaller: stops closer to the moment they are, with one engine
    call per segment)."""

    def __post_init__(self) -> None:
        _check(self.max_staleness >= 0, "rollout.asynchronous", "max_staleness", self.max_staleness, ">= 0")
        if self.over_provision is not None:
            _check(
                self.over_provision >= 0,
                "rollout.asynchronous",
                "over_provision",
                self.over_provision,
                ">= 0 (or null: a quarter of rollout_batch_size)",
            )
        _choice(self.on_stale, ("drop", "wait"), "rollout.asynchronous", "on_stale")
        _check(self.segment_tokens >= 1, "rollout.asynchronous", "segment_tokens", self.segment_tokens, ">= 1")

    @property
    def active(self) -> bool:
        """Whether rollouts are asynchronous at all (``max_staleness > 0``)."""
        return self.max_staleness > 0

    def groups_in_flight(self, rollout_batch_size: int) -> int:
        """Prompt groups a rollout decodes at once: its own, the over-provision, within the capacity bound."""
        extra = max(1, rollout_batch_size // 4) if self.over_provision is None else self.over_provision
        return min(rollout_batch_size + extra, (self.max_staleness + 1) * rollout_batch_size)
