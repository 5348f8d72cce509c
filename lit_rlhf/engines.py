"""The rollout engine interface: what generates a rollout's responses.

``rollout.engine: native`` is the actor's own sampler (``Actor.generate``); an engine component
(``lit_rlhf.rollout.VLLMEngine``) generates elsewhere and receives the actor's weights before every
rollout. Kept free of heavy imports so the settings groups can name the type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class RolloutEngine(ABC):
    """Base of rollout engines: subclasses implement ``start``, ``sync_weights`` and ``generate``
    (and ``init_args``, so that a config can rebuild them)."""

    def check_settings(self, models: Any, generation: Any) -> None:
        """Raise if the engine cannot run these settings as the trainer would (before models load).

        Every setting is accepted unless an engine says otherwise.
        """
        return None

    @abstractmethod
    def start(self, module: Any) -> bool:
        """Start the engine for this process (after the models load); False if it already runs."""

    @abstractmethod
    def sync_weights(self, module: Any) -> None:
        """Give the engine the actor's current weights (before every rollout)."""

    @abstractmethod
    def generate(self, input_ids, attention_mask, generation, seed: int):
        """Sample responses like ``Actor.generate`` (a ``GenerationOutput``)."""

    def shutdown(self) -> None:
        """Stop the engine and free what it holds (nothing, unless an engine holds something)."""
        return None

    def init_args(self) -> dict:
        return {}

    def to_config(self) -> dict:
        """``{class_path, init_args}`` that rebuild this engine (for checkpoints and loggers)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.init_args()}
