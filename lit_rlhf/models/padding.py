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
