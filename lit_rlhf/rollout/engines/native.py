"""NativeEngine: the actor's own sampler (``Actor.generate``) behind the engine contract."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
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

    shared_prefix_min = 32
    """inside ``prefix_cache()``, rows of one call whose prompts start with at least this many equal
    tokens prefill them once"""

    def __init__(self) -> None:
        self.actor: Any = None
        self.device: torch.device | None = None
        self._kept: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] | None = None

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
        self._kept = None

    @contextlib.contextmanager
    def prefix_cache(self) -> Iterator[None]:
        """Keep each row's keys and values between calls: a request that continues a row of the last
        call (its prompt starts with that row's prompt and sampled tokens: a next turn, or an asynchronous
        rollout's next segment of a row stopped at its budget) prefills only the new tokens,
        and rows of one call that share a long prompt prefix (a system prompt, the tools' schemas, a
        group of samples of one prompt) prefill it once. Kept only for models whose every layer is
        full attention with ``sdpa`` (``lit_rlhf.models.decoding.reuses_cache``); freed on leaving."""
        from lit_rlhf.models.decoding import reuses_cache

        outer = self._kept
        if self.actor is not None and reuses_cache(self.actor.model.config):
            self._kept = {}
        try:
            yield
        finally:
            self._kept = outer

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
        prefix, cached = None, [0] * len(requests)
        if self._kept is not None:
            prefix, cached = self._prefix(requests)
        suffixes = [list(r.prompt_ids[n:]) for r, n in zip(requests, cached, strict=True)]
        input_ids, attention_mask = left_padded(suffixes, actor.pad_token_id, device)
        budgets = [r.max_new_tokens or generation.max_new_tokens for r in requests]
        if max(budgets) != generation.max_new_tokens:  # rows of a multi-turn rollout with budgets of their own
            generation = dataclasses.replace(generation, max_new_tokens=max(budgets))
        stop_ids = None
        if any(r.stop_token_ids for r in requests):
            most = max(len(r.stop_token_ids) for r in requests)
            stop_ids = torch.tensor([r.stop_token_ids + (-1,) * (most - len(r.stop_token_ids)) for r in requests])
        generator = torch.Generator(device).manual_seed(requests[0].seed)
        kept: list | None = [] if self._kept is not None else None
        gen = actor.generate(
            input_ids,
            attention_mask,
            generation,
            generator=generator,
            on_token=on_token,
            stop_token_ids=stop_ids,
            prefix=prefix,
            kept=kept,
        )
        samples = [  # a row past its own budget is cut there
            s if len(s.token_ids) <= n else Sample(s.token_ids[:n], s.log_probs[:n], "length")
            for s, n in zip(unpack_samples(gen), budgets, strict=True)
        ]
        if kept is not None:  # what a next call can continue: a next turn, or a row stopped at its budget
            for request, n in zip(requests, cached, strict=True):  # a continued row's old entry is used up
                self._kept.pop(request.prompt_ids[:n], None)
            self._kept.update(
                (r.prompt_ids + s.token_ids[:-1], kv)
                for r, s, kv in zip(requests, samples, kept, strict=True)
                if s.token_ids and kv[0].shape[2] == len(r.prompt_ids) + len(s.token_ids) - 1
            )
        return samples

    def _prefix(self, requests: Sequence[GenerationRequest]) -> tuple[Any, list[int]]:
        """The cached prefix of every row (the kept keys and values of a row it continues, else a
        prompt prefix it shares with other rows of this call) and how many of its tokens it covers."""
        from lit_rlhf.models.decoding import CachedPrefix

        kept, found = self._kept or {}, []
        lengths = sorted({len(ids) for ids in kept}, reverse=True)
        for request in requests:
            ids = request.prompt_ids
            n = next((n for n in lengths if n < len(ids) and ids[:n] in kept), 0)
            found.append((n, kept[ids[:n]]) if n else None)
        fresh = [r.prompt_ids for r, hit in zip(requests, found, strict=True) if hit is None]
        shared: tuple[int, ...] = ()
        if len(fresh) > 1:
            shared = tuple(os.path.commonprefix(fresh))[: min(len(ids) for ids in fresh) - 1]
        if len(shared) >= self.shared_prefix_min:
            keys, values = self.actor.prefill(list(shared))
            shared_kv = (torch.cat(keys), torch.cat(values))  # [L, H, n, D]
            found = [hit or (len(shared), shared_kv) for hit in found]
        if all(hit is None for hit in found):
            return None, [0] * len(requests)
        reference = next(hit[1][0] for hit in found if hit is not None)
        width = max(hit[0] for hit in found if hit is not None)
        layers, heads, _, dim = reference.shape
        keys = reference.new_zeros(layers, len(requests), heads, width, dim)
        values = torch.zeros_like(keys)
        mask = torch.zeros(len(requests), width, dtype=torch.long, device=reference.device)
        for row, hit in enumerate(found):
            if hit is not None:
                n, (k, v) = hit
                keys[:, row, :, width - n :], values[:, row, :, width - n :] = k, v
                mask[row, width - n :] = 1
        return CachedPrefix(list(keys), list(values), mask), [hit[0] if hit else 0 for hit in found]
