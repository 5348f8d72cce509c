"""The rollout engine contract: token ids in, sampled token ids (with their log-probs) out.

An engine gets one :class:`GenerationRequest` per row (the prompt's token ids, the row's seed, the
ids that end it) and returns one :class:`Sample` per row: exactly the tokens it sampled, their
log-probs under the sampling policy and why the row ended. It never sees a LightningModule or
text: it is started with the actor (``start``), receives the actor's weights before every rollout
(``sync_weights``) and samples (``generate``). ``lit_rlhf.rollout.engines.pack_samples`` turns the
samples into the tensors the scorer reads. Kept free of heavy imports, so the settings groups can
name the type.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length")


@dataclass(frozen=True)
class GenerationRequest:
    """One row to sample.

    prompt_ids: the prompt's token ids (no padding): in a multi-turn rollout, the conversation so far.
    seed: the row's seed: the same request with the same weights samples the same tokens.
    stop_token_ids: ids that end this row like an EOS (in addition to the actor's EOS ids).
    max_new_tokens: this row's token budget (None: ``generation.max_new_tokens``).
    """

    prompt_ids: tuple[int, ...]
    seed: int
    stop_token_ids: tuple[int, ...] = ()
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Sample:
    """What an engine sampled for one request.

    token_ids: the sampled tokens, in order; the last one is the EOS or stop token of a row that
        ended by itself (``finish_reason == "stop"``). Every one of them was sampled by the policy.
    log_probs: each token's log-prob under the sampling policy (the sampling temperature, before
        top-k/top-p filtering).
    finish_reason: ``stop`` (an EOS, a stop token or a stop string) or ``length`` (``max_new_tokens``).
    loss_mask: 1 where the policy sampled the token, 0 where it did not (a multi-turn trajectory's tool
        output and template junctions); None: every token was sampled (what an engine returns).
    """

    token_ids: tuple[int, ...]
    log_probs: tuple[float, ...]
    finish_reason: FinishReason
    loss_mask: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.log_probs):
            raise ValueError(f"a Sample has {len(self.token_ids)} token ids but {len(self.log_probs)} log-probs")
        if self.loss_mask is not None and len(self.loss_mask) != len(self.token_ids):
            raise ValueError(f"a Sample has {len(self.token_ids)} token ids but a loss_mask of {len(self.loss_mask)}")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Sample.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


# (done, total): told after every decoding step (a progress display); an engine that reports its steps
# stops decoding when it returns True, every row ending with the tokens it has (``length``)
OnToken = Callable[[int, int], bool | None]


class RolloutEngine(ABC):
    """Base of rollout engines: subclasses implement ``start``, ``sync_weights`` and ``generate``
    (and ``init_args``, so that a config can rebuild them)."""

    recomputes_old_log_probs: bool = True
    """whether the trainer recomputes the old log-probs by default (``rollout.recompute_old_log_probs:
    null``): an engine whose kernels differ from the trainer's says True."""
    samples_with_actor: bool = False
    """whether ``generate`` runs the trainer's own actor (then an FSDP2 actor is gathered around it)."""

    def check_settings(self, models: Any, generation: Any) -> None:
        """Raise if the engine cannot run these settings as the trainer would (before models load).

        Every setting is accepted unless an engine says otherwise.
        """
        return None

    @abstractmethod
    def start(self, actor: Any, device: Any) -> bool:
        """Start the engine for this process from the (loaded) actor, on ``device``; False if it already runs."""

    @abstractmethod
    def sync_weights(self, actor: Any) -> None:
        """Give the engine the actor's current weights (before every rollout)."""

    @abstractmethod
    def generate(
        self, requests: list[GenerationRequest], generation: Any, on_token: OnToken | None = None
    ) -> list[Sample]:
        """One :class:`Sample` per request, in the requests' order, sampled with ``generation``
        (``GenerationSettings``: temperature, top-k/p, ``max_new_tokens``, stop strings)."""

    @contextlib.contextmanager
    def prefix_cache(self) -> Iterator[None]:
        """Within this context the weights do not change, and the engine may keep what it computed for
        each row and reuse it for a later request whose prompt starts with that row's tokens (the turn
        loop opens it around a batch's turns: each turn's prompt is the last one's, its sampled tokens
        and an observation). What is sampled must not depend on it beyond float rounding. The default
        keeps nothing (an engine with a prefix cache of its own, like vLLM's, needs nothing here)."""
        yield

    def shutdown(self) -> None:
        """Stop the engine and free what it holds (nothing, unless an engine holds something)."""
        return None

    def init_args(self) -> dict:
        return {}

    def to_config(self) -> dict:
        """``{class_path, init_args}`` that rebuild this engine (for checkpoints and loggers)."""
        cls = engine_class(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RolloutEngine)
            and engine_class(other) is engine_class(self)
            and (self.init_args() == other.init_args())
        )

    __hash__ = None  # engines hold running state


def engine_class(engine: RolloutEngine) -> type:
    """The engine's class, also for a config's lazy instance (jsonargparse subclasses it on the fly)."""
    return next(
        cls
        for cls in type(engine).__mro__
        if issubclass(cls, RolloutEngine) and not cls.__name__.startswith("LazyInstance_")
    )
