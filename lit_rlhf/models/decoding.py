"""Decoding: the sampling rule, and the static KV cache the sampler grows, shrinks, starts from a
cached prefix and hands on (``Actor.generate``), with the checks of which models can do that."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import StaticCache

from lit_rlhf.settings import GenerationSettings


def sample_tokens(logits: Tensor, settings: GenerationSettings, uniform: Tensor) -> Tensor:
    """Draw one token per row from ``logits [B, V]`` (suppression, temperature, top-k, top-p).

    Inverse-CDF sampling with one uniform number per row (``uniform [B]`` in [0, 1)): a row's token
    depends only on its own logits and its own number, so dropping finished rows from the batch
    (see ``Actor.generate``) never changes what the other rows sample. The distribution is exactly
    the filtered softmax; tokens of probability 0 are never drawn.
    """
    if settings.suppress_token_ids:
        logits = logits.index_fill(-1, logits.new_tensor(settings.suppress_token_ids, dtype=torch.long), float("-inf"))
    if settings.temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(scores, min(settings.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - settings.top_p
        drop_sorted[:, -1] = False
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    cdf = scores.softmax(-1).cumsum(-1)
    # the first token whose cumulative probability exceeds u: right=True skips zero-probability tokens
    chosen = torch.searchsorted(cdf, (uniform.unsqueeze(1) * cdf[:, -1:]).contiguous(), right=True).squeeze(1)
    return chosen.clamp_max(cdf.shape[-1] - 1)


RESPONSE_ROOM = 32  # response tokens a generation's KV cache has room for at first (it doubles when full)


def grow(cache: StaticCache, length: int) -> None:
    """Give every layer of a static KV cache room for ``length`` positions (the filled ones are kept)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(*old.shape[:2], length, old.shape[-1])
                new[:, :, : old.shape[2]] = old
                setattr(layer, name, new)
        layer.max_cache_len = length


def select_rows(cache: StaticCache, rows: Tensor) -> None:
    """Keep only ``rows`` of every layer of a static KV cache (the batch shrinks in place)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            layer.batch_size = len(rows)


class CachedPrefix(NamedTuple):
    """Keys and values already computed for the first tokens of every row of a generation
    (``Actor.generate(prefix=...)``; the native engine builds it from earlier turns and shared prompts).

    keys, values: one ``[B, H, C, D]`` tensor per layer, a row's cached tokens right-aligned (padding first).
    mask: ``[B, C]`` 1 where a position holds a cached token. A row's cached tokens are its first ones,
    at positions ``0 .. n - 1``: the prompt handed to ``generate`` is the rest of the row.
    """

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor


def row_cache(cache: StaticCache, row: int, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Row ``row``'s keys and values at ``positions`` of a static cache, as ``[L, H, n, D]`` each."""
    layers = [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]
    keys = torch.stack([layer.keys[row, :, positions] for layer in layers])
    return keys, torch.stack([layer.values[row, :, positions] for layer in layers])


def takes_decode_mask(config) -> bool:
    """Whether decoding can hand the model a ready ``[B, 1, 1, cache]`` key mask: ``sdpa`` attention
    with no sliding-window layers (transformers then passes the mask through instead of building one
    per step; a sliding window needs its own per-layer mask, so those models keep the 2D mask)."""
    if config._attn_implementation != "sdpa" or getattr(config, "sliding_window", None) is not None:
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])


def reuses_cache(config) -> bool:
    """Whether a generation can start from cached keys and values (:class:`CachedPrefix`): every layer
    is full attention with ``sdpa`` (a sliding window or a recurrent layer would need its own state)."""
    return takes_decode_mask(config)


def runs_shared_prefix(model: nn.Module) -> bool:
    """Whether a scoring or training forward of ``model`` may run the rows' shared prefix once
    (``lit_rlhf.models.padding.split_shared_prefix``): :func:`reuses_cache` holds and activation
    checkpointing is off (it would not hand the prefix's keys and values on) and the model is not
    sharded (FSDP frees a layer's gathered weights after its forward, and the prefix's forward is a
    second one in the same step)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if not reuses_cache(model.config) or getattr(model, "is_activation_checkpointing", False):
        return False
    return not any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())
