"""Partial rollouts with carry-over: what an asynchronous rollout keeps in flight between rollouts.

A rollout decodes its prompt groups a segment (``asynchronous.segment_tokens``) at a time and ends as
soon as ``rollout_batch_size`` groups are complete. The rows still decoding stay in flight with the
tokens they have, their behaviour log-probs and each token's policy version, and continue in the next
rollout (prompt + kept tokens, sampled by the new weights). :class:`InFlight` is that state (plain
numbers and lists, so it goes into checkpoints as it is); :class:`CarryOver` runs one rollout's
generation over it. Everything here is engine-agnostic: a row is stopped by its segment budget and
resumed by a request that continues it, which every engine serves (the native engine keeps the rows'
keys and values inside its ``prefix_cache()``; vLLM's prefix cache does the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from lit_rlhf.rollout.engines.base import GenerationRequest, OnToken, RolloutEngine, Sample
from lit_rlhf.settings import AsyncSettings, GenerationSettings

SEED_STRIDE = 1_000_003  # a continuation's seed: the row's seed moved by its kept tokens (a new stream per segment)


@dataclass
class Row:
    """One sample of a prompt group, possibly unfinished.

    prompt_ids: the prompt's token ids. seed: the row's seed. token_ids, log_probs, versions: what was
    sampled so far, the behaviour log-prob of each token and the policy version that sampled it.
    finish_reason: None while the row is still decoding, else ``stop`` or ``length``.
    """

    prompt_ids: list[int]
    seed: int
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def sample(self) -> Sample:
        return Sample(tuple(self.token_ids), tuple(self.log_probs), self.finish_reason or "length")


@dataclass
class Group:
    """The ``n_samples_per_prompt`` rows of one prompt: ``position`` in this rank's prompt stream,
    admitted in rollout ``admitted``."""

    position: int
    admitted: int
    rows: list[Row]

    @property
    def complete(self) -> bool:
        return all(row.finish_reason is not None for row in self.rows)

    @property
    def oldest(self) -> int:
        """The oldest policy version among its tokens (the admitting rollout's, before any token)."""
        return min((min(row.versions) for row in self.rows if row.versions), default=self.admitted)


@dataclass
class InFlight:
    """What an asynchronous rollout leaves for the next one: the groups in flight (admission order) and
    the next unread position of this rank's prompt stream."""

    groups: list[Group] = field(default_factory=list)
    next_position: int = 0

    def state_dict(self) -> dict:
        return {"groups": [dataclasses.asdict(g) for g in self.groups], "next_position": self.next_position}

    @classmethod
    def from_state(cls, state: dict) -> InFlight:
        groups = [
            Group(g["position"], g["admitted"], [Row(**row) for row in g["rows"]]) for g in state.get("groups", [])
        ]
        return cls(groups, int(state.get("next_position", 0)))

    def copy(self) -> InFlight:
        return InFlight.from_state(self.state_dict())


@dataclass
class Outcome:
    """One rollout's generation: the groups it trains (``rollout_batch_size``, due ones first), the rows
    dropped (stale, or unfinished without carry-over), the rows carried over to the next rollout and the
    decode steps the engine ran (the sum of its segments' longest)."""

    trained: list[Group]
    dropped_rows: int
    carried_rows: int
    decode_steps: int


# positions -> prompt token ids, one list per position (this rank's prompt stream)
PromptIds = Callable[[list[int]], list[list[int]]]


class CarryOver:
    """Runs the generation of asynchronous rollouts over an :class:`InFlight` state.

    Args:
        settings: the ``rollout.asynchronous`` group. rollout_batch_size: groups trained per rollout.
        n_samples: rows per group. base_seed: this rank's first row seed (``rollout_seed(seed, 0, rank)``).
        stop_strings: decides where a response first completes a stop string (``StopStrings.first_stop``),
            also across segments (None: no stop strings).
    """

    def __init__(
        self,
        settings: AsyncSettings,
        rollout_batch_size: int,
        n_samples: int,
        base_seed: int,
        stop_strings: Callable[[list[int]], int | None] | None = None,
    ) -> None:
        self.settings, self.batch, self.n, self.base_seed = settings, rollout_batch_size, n_samples, base_seed
        self.first_stop = stop_strings
        self.state = InFlight()

    def admit(self, rollout: int, prompt_ids: PromptIds) -> int:
        """Drop the groups that would exceed the staleness bound if trained now, then top the groups in
        flight up to ``groups_in_flight`` with new prompts. Returns the rows dropped."""
        bound = rollout - self.settings.max_staleness
        stale = [g for g in self.state.groups if g.oldest < bound]
        self.state.groups = [g for g in self.state.groups if g.oldest >= bound]
        room = self.settings.groups_in_flight(self.batch) - len(self.state.groups)
        positions = list(range(self.state.next_position, self.state.next_position + max(room, 0)))
        for position, ids in zip(positions, prompt_ids(positions) if positions else [], strict=True):
            rows = [Row(list(ids), self.base_seed + position * self.n + i) for i in range(self.n)]
            self.state.groups.append(Group(position, rollout, rows))
        self.state.next_position += len(positions)
        return sum(len(g.rows) for g in stale)

    def due(self, rollout: int) -> list[Group]:
        """Groups whose oldest token reaches the bound in this rollout: trained now or never."""
        return [g for g in self.state.groups if g.oldest <= rollout - self.settings.max_staleness]

    def enough(self, rollout: int) -> bool:
        """Whether the rollout can end: ``rollout_batch_size`` groups complete, and with ``on_stale: wait``
        every due group among them."""
        complete = sum(g.complete for g in self.state.groups)
        if complete < self.batch:
            return False
        return self.settings.on_stale == "drop" or all(g.complete for g in self.due(rollout))

    def run(
        self,
        rollout: int,
        engine: RolloutEngine,
        generation: GenerationSettings,
        prompt_ids: PromptIds,
        on_token: OnToken | None = None,
    ) -> Outcome:
        """Rollout ``rollout``'s generation: admit, decode segments until :meth:`enough` (or nothing is
        left to decode), take the groups to train and leave the rest in flight."""
        dropped = self.admit(rollout, prompt_ids)
        steps, max_new = 0, generation.max_new_tokens
        with engine.prefix_cache():  # the weights do not change within one rollout
            first = True
            while not self.enough(rollout):
                live = [row for g in self.state.groups for row in g.rows if row.finish_reason is None]
                if not live:
                    break
                # the rows resumed from the last rollout prefill their kept tokens again (new weights): apart
                # from the new prompts, so that a padded prefill does not pad every new prompt to their length
                resumed = [row for row in live if row.token_ids] if first else []
                calls = [resumed, [row for row in live if not row.token_ids]] if resumed else [live]
                for rows in (call for call in calls if call):
                    samples = engine.generate(self._requests(rows, generation), generation, on_token)
                    steps += max((len(s.token_ids) for s in samples), default=0)
                    for row, sample in zip(rows, samples, strict=True):
                        self._extend(row, sample, rollout, max_new)
                first = False
        trained = self._take(rollout)
        if not self.settings.carry_over:  # unfinished rows are not kept: their groups go
            unfinished = [g for g in self.state.groups if not g.complete]
            dropped += sum(len(g.rows) for g in unfinished)
            self.state.groups = [g for g in self.state.groups if g.complete]
        carried = sum(len(g.rows) for g in self.state.groups)
        return Outcome(trained, dropped, carried, steps)

    def _requests(self, rows: list[Row], generation: GenerationSettings) -> list[GenerationRequest]:
        """Each row's next segment: its prompt and kept tokens, a seed of its own, at most ``segment_tokens``."""
        budget, max_new, stops = self.settings.segment_tokens, generation.max_new_tokens, generation.stop_token_ids
        return [continuation(row, stops, min(budget, max_new - len(row.token_ids))) for row in rows]

    def _extend(self, row: Row, sample: Sample, version: int, max_new: int) -> None:
        extend(row, sample, version, max_new, self.first_stop)

    def _take(self, rollout: int) -> list[Group]:
        """The groups to train: complete ones, due first, then the oldest; the others stay in flight."""
        complete = [g for g in self.state.groups if g.complete]
        bound = rollout - self.settings.max_staleness
        complete.sort(key=lambda g: (g.oldest > bound, g.oldest, g.position))
        trained = complete[: self.batch]
        taken = {id(g) for g in trained}
        self.state.groups = [g for g in self.state.groups if id(g) not in taken]
        trained.sort(key=lambda g: g.position)
        return trained


def continuation(row: Row, stop_token_ids: tuple[int, ...], budget: int) -> GenerationRequest:
    """The request that continues ``row``: its prompt and kept tokens, a seed moved by the kept tokens
    (a new random stream for the continuation), at most ``budget`` new tokens."""
    return GenerationRequest(
        tuple(row.prompt_ids + row.token_ids),
        row.seed + SEED_STRIDE * len(row.token_ids),
        tuple(stop_token_ids),
        budget,
    )


def extend(
    row: Row, sample: Sample, version: int, max_new: int, first_stop: Callable[[list[int]], int | None] | None
) -> None:
    """Append a continuation's tokens (sampled by policy ``version``) to its row; the row ends at a stop,
    at ``max_new`` tokens, or at a stop string (``first_stop``) that the continuation's boundary hid from
    the engine."""
    start = len(row.token_ids)
    row.token_ids.extend(sample.token_ids)
    row.log_probs.extend(sample.log_probs)
    row.versions.extend([version] * len(sample.token_ids))
    if sample.finish_reason == "stop":
        row.finish_reason = "stop"
    elif first_stop is not None and start:  # the engine saw only this continuation's tokens
        end = first_stop(row.token_ids)
        if end is not None:
            del row.token_ids[end + 1 :], row.log_probs[end + 1 :], row.versions[end + 1 :]
            row.finish_reason = "stop"
    if row.finish_reason is None and len(row.token_ids) >= max_new:
        row.finish_reason = "length"
