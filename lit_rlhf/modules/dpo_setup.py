"""DPOModule's settings groups, its reference model, and the log-probs of a batch's answers.

A preference batch (``PreferenceDataModule``) is ``2B`` right-padded rows, the chosen answers then
the rejected ones, with ``labels`` marking each row's answer tokens; every function here takes it
whole, so chosen and rejected always go through one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lit_rlhf import functional as F
from lit_rlhf.data.sft import IGNORE_INDEX, pad_right
from lit_rlhf.models import Actor
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.settings import DPOModelSettings, DPOSettings


def check_dpo_settings(models: DPOModelSettings, algorithm: DPOSettings) -> None:
    """The checks that span the groups (each group has checked its own fields)."""
    if algorithm.reference_free and models.reference_path is not None:
        raise ValueError(
            "algorithm.reference_free uses no reference model, but models.reference_path is set; remove one of them"
        )


class AnswerLogProbs(NamedTuple):
    """Each row's answer: the sum of its tokens' log-probs ``[2B]`` (fp32) and its token count ``[2B]``."""

    sums: Tensor
    counts: Tensor

    def chosen_rejected(self, average: bool) -> tuple[Tensor, Tensor]:
        """``(chosen, rejected)`` ``[B]`` sums, or per-token averages with ``average``."""
        values = self.sums / self.counts.clamp_min(1) if average else self.sums
        return values.chunk(2)


def answer_log_probs(actor: Actor, batch: dict[str, Tensor]) -> AnswerLogProbs:
    """One forward of ``actor`` over all rows; the log-probs of the answer tokens (``labels``), summed per row.

    Logits are computed from the first column where any row's answer starts, and columns that are
    padding in every row are skipped (``Actor.action_logits``, also with ``padding_free``).
    """
    answer = batch["labels"] != IGNORE_INDEX
    first = max(1, int(answer.long().argmax(-1).min()))  # token 0 has no predictor
    num_actions = answer.shape[1] - first
    log_probs = actor(batch["input_ids"], batch["attention_mask"], num_actions)
    mask = answer[:, first:]
    return AnswerLogProbs(F.sequence_log_probs(log_probs, mask), mask.sum(-1))


@torch.no_grad()
def reference_answer_log_probs(policy: PolicySet, batch: dict[str, Tensor]) -> AnswerLogProbs:
    """:func:`answer_log_probs` of the reference model, or of the policy with its LoRA adapter disabled."""
    with policy.reference_policy() as reference:
        return answer_log_probs(reference, batch)


def row_key(ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> bytes:
    """A 128-bit digest of a row's tokens and labels: the same answer in any batch has the same key."""
    import xxhash  # here, not at import: a PPO run (and the GPU check) never needs it

    digest = xxhash.xxh3_128()
    digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.digest()


def batch_keys(batch: dict[str, Tensor]) -> list[bytes]:
    """:func:`row_key` of every row of a right-padded batch."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    ids, labels = batch["input_ids"].cpu().numpy(), batch["labels"].cpu().numpy()
    return [row_key(ids[i, :n], labels[i, :n]) for i, n in enumerate(lengths)]


def collate_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Rows ``(ids, labels)`` as a right-padded batch on ``device``."""
    batch = {
        "input_ids": pad_right([ids for ids, _ in rows], pad_id),
        "attention_mask": pad_right([[1] * len(ids) for ids, _ in rows], 0),
        "labels": pad_right([labels for _, labels in rows], IGNORE_INDEX),
    }
    return {k: v.to(device) for k, v in batch.items()}


def pair_key(example: Any) -> bytes:
    """The keys of a ``PreferenceExample``'s two rows: what :func:`batch_keys` gives for row ``i`` and ``i + B``."""
    return row_key(example.chosen_ids, example.chosen_labels) + row_key(example.rejected_ids, example.rejected_labels)


class ReferenceCache:
    """The reference log-prob sum of every answer row, computed once and looked up by the row's tokens.

    :meth:`fill` runs before training over the datamodule's examples: the rows (each distinct row
    once, shortest first, so forwards carry little padding) are split across ranks, each rank scores
    its share, and the sums are all-gathered, so every rank can look up any row its sampler draws.
    """

    def __init__(self) -> None:
        self.sums: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self.sums)

    def fill(
        self,
        rows: list[tuple[list[int], list[int]]],
        score: Callable[[dict[str, Tensor]], Tensor],
        rows_per_forward: int,
        pad_id: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        all_gather: Callable[[Tensor], Tensor] = lambda x: x,
    ) -> None:
        """Score the rows not cached yet (``score(batch) -> [rows]``); every rank runs as many forwards."""
        todo = {row_key(ids, labels): (ids, labels) for ids, labels in rows}
        todo = sorted(
            (item for item in todo.items() if item[0] not in self.sums), key=lambda kv: (len(kv[1][0]), kv[0])
        )
        if not todo:
            return
        per_rank = -(-len(todo) // world_size)
        mine = [row for _, row in todo[rank::world_size]]
        mine += [todo[0][1]] * (per_rank - len(mine))  # equal shares: FSDP2 ranks forward together
        chunks = [mine[i : i + rows_per_forward] for i in range(0, per_rank, rows_per_forward)]
        local = torch.cat([score(collate_rows(chunk, pad_id, device)).float() for chunk in chunks])
        gathered = all_gather(local).reshape(world_size, per_rank).cpu().tolist()
        for i, (key, _) in enumerate(todo):
            self.sums[key] = gathered[i % world_size][i // world_size]

    def lookup(self, batch: dict[str, Tensor]) -> Tensor:
        """The cached sums ``[rows]`` of a batch's rows.

        Raises:
            KeyError: a row that is not among the examples the cache was filled with.
        """
        try:
            values = [self.sums[key] for key in batch_keys(batch)]
        except KeyError:
            raise KeyError(
                "a batch row is not in the reference cache (it holds the datamodule's train and val examples); "
                "batches from elsewhere need algorithm.reference_cache: false"
            ) from None
        return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)
