"""Forwards that skip padding: trim columns that are padding in every row, or pack rows into one.

Rollout batches are left-padded prompts followed by right-padded responses, so a micro-batch often
has whole columns of padding (the longest prompt is shorter than the batch's prompt width, every
response ended before the longest one in the rollout). Both helpers below give the same outputs on
valid tokens as the plain padded forward (within float tolerance; tests check it):

- ``valid_window``: drop leading/trailing columns that are padding in every row. Always on; costs
  one host read of two integers per forward.
- ``pack_rows`` + ``packed_forward``: concatenate the valid tokens of all rows into a single row
  whose position ids restart at every row, so the linear layers (most of the work) never see
  padding. Attention stays within each row: ``flash_attention_2`` reads the row boundaries from the
  position ids (varlen kernels); ``sdpa`` runs ``packed_sdpa_attention``, one causal attention call
  per run of equal-length rows and never over padding (``eager`` falls back to a block-diagonal
  mask over the packed length). Opt-in (``padding_free``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lit_rlhf.models.loading import position_ids_from_mask


def valid_window(attention_mask: Tensor, num_actions: int = 0) -> tuple[int, int]:
    """Columns ``[start, end)`` outside which every row is padding.

    With ``num_actions`` the window also keeps the column before the actions (it predicts the first
    one) and at least one action column, so callers can slice actions relative to ``end``.
    """
    valid = attention_mask.bool().any(0)
    total = valid.shape[0]
    columns = torch.arange(total, device=valid.device)
    bounds = torch.stack([torch.where(valid, columns, total).min(), torch.where(valid, columns, -1).max()])
    start, last = bounds.tolist()
    if last < 0:  # no valid token at all
        return 0, total
    end = last + 1
    if num_actions:
        start, end = max(0, min(start, total - num_actions - 1)), max(end, total - num_actions + 1)
    return start, end


def shared_prefix(sequences: Tensor, attention_mask: Tensor, num_actions: int) -> tuple[int, Tensor]:
    """How many first tokens every row of a ``[B, T]`` batch shares (a system prompt, the tools'
    schemas, the samples of one prompt), before the token that predicts the first action, and each
    row's first valid column ``[B]``."""
    starts = attention_mask.long().argmax(1)
    room = sequences.shape[1] - num_actions - 1 - int(starts.max())  # the prefix ends before every row's predictor
    if room <= 0 or sequences.shape[0] < 2:
        return 0, starts
    tokens = sequences.gather(1, starts[:, None] + torch.arange(room, device=sequences.device))
    same = (tokens == tokens[:1]).all(0)
    return int(same.long().cumprod(0).sum()), starts


SHARED_PREFIX_MIN = 32
"""a batch whose rows start with at least this many equal tokens runs them once (``split_shared_prefix``)"""


class PrefixSplit(NamedTuple):
    """A batch split into the first ``length`` tokens every row shares and each row's rest.

    starts: each row's first valid column ``[B]``. sequences, attention_mask: ``[B, T - length]`` each
    row without its shared tokens, still left-padded as before, so column ``c`` of the batch is
    column ``c - length`` of the rest (the actions end where they did).
    """

    length: int
    starts: Tensor
    sequences: Tensor
    attention_mask: Tensor


def split_shared_prefix(
    sequences: Tensor, attention_mask: Tensor, num_actions: int = 0, packing: bool = False
) -> PrefixSplit | None:
    """The batch's shared prefix and each row's rest, or None: fewer than ``SHARED_PREFIX_MIN`` shared
    tokens, or (``packing``: the alternative is a padding-free forward) the prefix once plus the
    rest's window would run more tokens than packing the valid tokens."""
    length, starts = shared_prefix(sequences, attention_mask, num_actions)
    if length < SHARED_PREFIX_MIN:
        return None
    columns = torch.arange(sequences.shape[1] - length, device=sequences.device)
    after = columns[None, :] >= starts[:, None]
    rest_mask = attention_mask[:, length:] * after
    if packing:
        start, end = valid_window(rest_mask, num_actions)
        if length + len(sequences) * (end - start) >= int(attention_mask.sum()):
            return None
    return PrefixSplit(length, starts, sequences[:, length:].masked_fill(~after, 0), rest_mask)


def shared_prefix_cache(module: nn.Module, split: PrefixSplit, sequences: Tensor, **kwargs: Any):
    """The keys and values of the shared tokens, from one forward of ``module`` over one row, seen by
    every row (in the autograd graph: the gradients of all rows flow back into that one forward)."""
    from transformers import DynamicCache

    first = int(split.starts[0])
    cache = DynamicCache(config=module.config)
    module(input_ids=sequences[:1, first : first + split.length], past_key_values=cache, use_cache=True, **kwargs)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(len(sequences), -1, -1, -1)
        layer.values = layer.values.expand(len(sequences), -1, -1, -1)
    return cache


def after_cache(mask: Tensor, length: int) -> Tensor:
    """``mask`` of a rest's window with the ``length`` cached shared tokens in front (what the model attends to)."""
    return torch.cat([mask.new_ones(mask.shape[0], length), mask], 1) if length else mask


class PackedRows(NamedTuple):
    """The valid tokens of a ``[B, T]`` batch as one row.

    input_ids: ``[1, N]`` the valid tokens, row after row.
    position_ids: ``[1, N]`` positions restarting at 0 for every row.
    index: ``[B, T]`` where each token went in the packed row, -1 for padding.
    """

    input_ids: Tensor
    position_ids: Tensor
    index: Tensor


def pack_rows(sequences: Tensor, attention_mask: Tensor) -> PackedRows:
    """Pack the tokens where ``attention_mask`` is 1 into one row (padding removed)."""
    valid = attention_mask.bool()
    index = torch.where(valid, valid.flatten().long().cumsum(0).view_as(valid) - 1, -1)
    positions = position_ids_from_mask(attention_mask)
    return PackedRows(sequences[valid].unsqueeze(0), positions[valid].unsqueeze(0), index)


def unpack(values: Tensor, index: Tensor) -> Tensor:
    """``[B, k, ...]`` outputs from packed ``values [N', ...]`` taken in the order of ``index >= 0``.

    ``values`` holds one entry per valid entry of ``index [B, k]`` (row-major order); positions
    where ``index`` is -1 get zeros. Differentiable.
    """
    keep = index >= 0
    out = values.new_zeros(*index.shape, *values.shape[1:])
    out[keep] = values
    return out


def length_groups(
    lengths: Tensor, max_rows: int, max_tokens: int | None = None, count: int | None = None
) -> list[Tensor]:
    """Row indices in micro-batches of similar length (shortest first), so little padding is computed.

    Rows are sorted by ``lengths``; a group closes at ``max_rows`` rows or, with ``max_tokens``, before
    its rows x its longest length would pass ``max_tokens`` (a longer row gets a group of its own).
    With ``count`` (at least the number of groups formed), the largest groups are halved until there
    are exactly ``count``: under DDP/FSDP every rank must run the same number of forwards.
    """
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    bounds, start = [], 0
    for i, length in enumerate(sorted_lengths):
        size = i - start + 1
        if i > start and (size > max_rows or (max_tokens is not None and size * length > max_tokens)):
            bounds.append((start, i))
            start = i
    bounds.append((start, len(sorted_lengths)))
    while count is not None and len(bounds) < count:
        splittable = [ab for ab in bounds if ab[1] - ab[0] >= 2]
        if not splittable:  # every group is a single row: as many forwards as rows
            break
        a, b = max(splittable, key=lambda ab: (ab[1] - ab[0]) * sorted_lengths[ab[1] - 1])
        middle = (a + b) // 2
        at = bounds.index((a, b))
        bounds[at : at + 1] = [(a, middle), (middle, b)]
    return [order[a:b] for a, b in bounds]


PACKED_SDPA = "lit_rlhf_packed_sdpa"  # the attention implementation packed sdpa forwards run under


@dataclass
class RowRuns:
    """The rows of a packed forward as runs of equal length: ``(first token, rows, length)`` each.

    ``calls`` counts the attention calls that read it (a model that bypasses transformers' attention
    interface leaves it at 0, see ``packed_forward``).
    """

    runs: list[tuple[int, int, int]]
    calls: int = 0


def row_runs(lengths: list[int]) -> RowRuns:
    """Runs of consecutive rows of equal length (rows of length 0 hold no token and are skipped)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for length in lengths:
        if length == 0:
            continue
        if runs and runs[-1][2] == length:
            first, rows, _ = runs[-1]
            runs[-1] = (first, rows + 1, length)
        else:
            runs.append((start, 1, length))
        start += length
    return RowRuns(runs)


def _window_mask(length: int, window: int, device: torch.device) -> Tensor:
    """``[length, length]`` causal mask that also hides keys ``window`` or more positions back."""
    position = torch.arange(length, device=device)
    back = position[:, None] - position[None, :]
    return (back >= 0) & (back < window)


def packed_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_rows: RowRuns | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention over one packed row ``[1, heads, N, head_dim]``: causal within each row.

    Each run of equal-length rows is viewed as a ``[rows, heads, length, head_dim]`` batch and goes
    through transformers' own sdpa attention with ``is_causal`` (a sliding window becomes a mask),
    so no query ever meets another row's keys and nothing is computed for padding.
    """
    if packed_rows is None:
        raise RuntimeError(f"{PACKED_SDPA} attention needs the packed rows' boundaries (use packed_forward)")
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "models.padding_free with sdpa attention cannot apply this model's attention logit softcapping: "
            "set models.padding_free: false"
        )
    window = kwargs.get("sliding_window")
    packed_rows.calls += 1
    outputs = []
    for first, rows, length in packed_rows.runs:
        end = first + rows * length
        q, k, v = (x[0, :, first:end].unflatten(1, (rows, length)).transpose(0, 1) for x in (query, key, value))
        mask = _window_mask(length, window, query.device) if window is not None and length > window else None
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=mask is None)
        outputs.append(out.reshape(1, rows * length, *out.shape[2:]))  # [rows, length, heads, dim] in order
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)


def packed_forward(model: nn.Module, packed: PackedRows, lengths: Tensor, **inputs: Any) -> Any:
    """``model`` (a transformers model, or a peft model) on ``packed`` rows, attention within each row.

    ``lengths [B]``: the valid tokens of each packed row, in order. With ``sdpa`` attention the
    forward runs under ``packed_sdpa_attention`` (no mask is built); ``flash_attention_2`` finds the
    rows from the position ids itself. Gradient checkpointing recomputes layers after this call
    returns, so there the model keeps transformers' own packed path (a block-diagonal mask).
    """
    config = model.config
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    packable = config._attn_implementation == "sdpa" and not checkpointing
    if not packable:
        return model(input_ids=packed.input_ids, position_ids=packed.position_ids, **inputs)
    runs = row_runs(lengths.tolist())
    config._attn_implementation = PACKED_SDPA
    try:
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, packed_rows=runs, **inputs)
    finally:
        config._attn_implementation = "sdpa"
    if runs.calls == 0:
        raise RuntimeError(
            f"{type(model).__name__} does not run its attention through transformers' attention interface, "
            "so its rows cannot be packed: set models.padding_free: false"
        )
    return out
