"""Forwards that skip padding: trim columns that are padding in every row, or pack rows into one.

Rollout batches are left-padded prompts followed by right-padded responses, so a micro-batch often
has whole columns of padding (the longest prompt is shorter than the batch's prompt width, every
response ended before the longest one in the rollout). Both helpers below give the same outputs on
valid tokens as the plain padded forward (within float tolerance; tests check it):

- ``valid_window``: drop leading/trailing columns that are padding in every row. Always on; costs
  one host read of two integers per forward.
- ``pack_rows``: concatenate the valid tokens of all rows into a single row whose position ids
  restart at every row; transformers reads the row boundaries from the position ids (varlen kernels
  with ``flash_attention_2``, a block-diagonal mask with ``sdpa``/``eager``). Opt-in
  (``padding_free``): it only pays off with a varlen attention kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

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
