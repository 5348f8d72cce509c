"""NativeEngine: the actor's own sampler (``Actor.generate``) behind the engine contract."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lit_rlhf.rollout.engines.base import GenerationRequest, OnToken, RolloutEngine, Sample


class NativeEngine(RolloutEngine):
    """Sample with the trainer's actor itself: no copy of the weights, nothing to sync.

    ``rollout.engine: native`` (the default) is a shorthand for this engine. The rows of one
    ``generate`` call are decoded together, left-padded, with a KV cache; finished rows leave the
    batch. Their random numbers come from one generator seeded by the first request's seed, one
    number per row and step, so a row's tokens depend on its seed, its position in the call and the
    weights, never on when the other rows finished. Its log-probs are the trainer's own (within
    float tolerance), so the old log-probs are reused by default.
    """

    recomputes_old_log_probs = False
    samples_with_actor = True

    def __init__(self) -> None:
        self.actor: Any = None
        self.device: torch.device | None = None

    def __repr__(self) -> str:
        return "NativeEngine()"

    def start(self, actor: Any, device: Any) -> bool:
        started = self.actor is None
        self.actor, self.device = actor, torch.device(device)
        return started

    def sync_weights(self, actor: Any) -> None:
        """Nothing to push: this engine samples with the actor's own weights."""
        self.actor = actor

    def shutdown(self) -> None:
        self.actor = self.device = None

    @torch.no_grad()
    def generate(
        self, requests: list[GenerationRequest], generation: Any, on_token: OnToken | None = None
    ) -> list[Sample]:
        from lit_rlhf.rollout.engines.packing import left_padded, unpack_samples  # transformers: once it samples

        if self.actor is None:
            raise RuntimeError("NativeEngine.generate before start(actor, device): the rollout starts it at fit start")
        if not requests:
            return []
        actor, device = self.actor, self.device
        input_ids, attention_mask = left_padded([list(r.prompt_ids) for r in requests], actor.pad_token_id, device)
        budgets = [r.max_new_tokens or generation.max_new_tokens for r in requests]
        if max(budgets) != generation.max_new_tokens:  # rows of a multi-turn rollout with budgets of their own
            generation = dataclasses.replace(generation, max_new_tokens=max(budgets))
        stop_ids = None
        if any(r.stop_token_ids for r in requests):
            most = max(len(r.stop_token_ids) for r in requests)
            stop_ids = torch.tensor([r.stop_token_ids + (-1,) * (most - len(r.stop_token_ids)) for r in requests])
        generator = torch.Generator(device).manual_seed(requests[0].seed)
        gen = actor.generate(
            input_ids, attention_mask, generation, generator=generator, on_token=on_token, stop_token_ids=stop_ids
        )
        samples = unpack_samples(gen)
        return [  # a row past its own budget is cut there
            s if len(s.token_ids) <= n else Sample(s.token_ids[:n], s.log_probs[:n], "length")
            for s, n in zip(samples, budgets, strict=True)
        ]
