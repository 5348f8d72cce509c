"""DPOModule's settings groups, its reference model, and the log-probs of a batch's answers.

A preference batch (``PreferenceDataModule``) is ``2B`` right-padded rows, the chosen answers then
the rejected ones, with ``labels`` marking each row's answer tokens; every function here takes it
whole, so chosen and rejected always go through one forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import xxhash
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_rlhf import functional as F
from lit_rlhf.data.sft import IGNORE_INDEX, pad_right
from lit_rlhf.functional import PreferenceLossType
from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.models.sharding import fsdp2_setup, shard_model
from lit_rlhf.rewards.model import freeze
from lit_rlhf.settings import ModelSettings


@dataclass(frozen=True, kw_only=True)
class DPOModelSettings(ModelSettings):
    """The policy DPO trains, its reference, and how they are loaded."""

    reference_path: str | None = None
    """the frozen reference policy; default ``path`` (with LoRA: the policy with its adapter disabled,
    no second copy)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference_path is not None and (not isinstance(self.reference_path, str) or not self.reference_path):
            raise ValueError(f"models.reference_path must be a model directory or hub id, got {self.reference_path!r}")


@dataclass(frozen=True, kw_only=True)
class DPOSettings:
    """The preference loss and where its reference log-probs come from."""

    loss_type: PreferenceLossType = "sigmoid"
    """``sigmoid`` (DPO), ``ipo`` (on per-token average log-probs, as TRL) or ``hinge`` (SLiC)."""
    beta: float = 0.1
    """strength of the implicit KL to the reference (larger: stay closer); SimPO's reward scale with
    ``reference_free`` (about 2 there)."""
    label_smoothing: float = 0.0
    """conservative DPO: the assumed probability that a pair's preference is flipped (sigmoid loss only)."""
    reference_free: bool = False
    """SimPO: no reference model; the loss compares length-normalised log-probs with the margin ``gamma``."""
    gamma: float = 0.0
    """SimPO's target reward margin (``reference_free`` only)."""
    reference_cache: bool | None = None
    """compute the reference log-probs of every training and validation answer once, before the first
    step, instead of in every step (None: cache when the reference is a separate frozen model, compute
    on the fly when it is the policy with its LoRA adapter disabled)."""

    def __post_init__(self) -> None:
        if self.loss_type not in F.PREFERENCE_LOSSES:
            raise ValueError(f"unknown algorithm.loss_type {self.loss_type!r}; valid: {', '.join(F.PREFERENCE_LOSSES)}")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"algorithm.beta must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"algorithm.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r} "
                "(0.5 would make every preference a coin flip)"
            )
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"algorithm.label_smoothing is defined for the sigmoid loss only; with loss_type={self.loss_type!r} "
                "set it to 0 (or use loss_type: sigmoid)"
            )
        if self.reference_free and self.loss_type != "sigmoid":
            raise ValueError(
                "algorithm.reference_free (SimPO) uses the sigmoid loss; set loss_type: sigmoid "
                f"(got {self.loss_type!r})"
            )
        if self.reference_free and self.reference_cache is not None:
            raise ValueError(
                "algorithm.reference_free uses no reference log-probs: leave algorithm.reference_cache null"
            )
        if self.gamma and not self.reference_free:
            raise ValueError(
                f"algorithm.gamma ({self.gamma}) is SimPO's margin and only applies with reference_free: true; "
                "set it to 0 or turn reference_free on"
            )
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"algorithm.gamma must be >= 0, got {self.gamma!r}")

    def caches_reference(self, separate_reference: bool) -> bool:
        """``reference_cache`` resolved: by default only for a separate frozen reference model."""
        if self.reference_free:
            return False
        return separate_reference if self.reference_cache is None else self.reference_cache


def check_dpo_settings(models: DPOModelSettings, algorithm: DPOSettings) -> None:
    """The checks that span the groups (each group has checked its own fields)."""
    if algorithm.reference_free and models.reference_path is not None:
        raise ValueError(
            "algorithm.reference_free uses no reference model, but models.reference_path is set; remove one of them"
        )


def check_reference_tokenizer(models: DPOModelSettings, tokenizer: PreTrainedTokenizerBase) -> None:
    """A separate reference reads the policy's token ids: its tokenizer must be the policy's."""
    if models.reference_path is None or models.reference_path == models.path:
        return
    other = load_tokenizer(models.reference_path, trust_remote_code=models.trust_remote_code)
    if other.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"models.reference_path {models.reference_path!r} has another tokenizer than models.path ({len(other)} vs "
            f"{len(tokenizer)} tokens), so it would read the policy's token ids as another vocabulary: the reference "
            "must be a policy with the same tokenizer (or leave reference_path null)"
        )


def build_reference(models: DPOModelSettings, tokenizer: PreTrainedTokenizerBase, reference_free: bool) -> Actor | None:
    """The frozen reference: None with ``reference_free``, or with LoRA and no ``reference_path`` (the
    policy with its adapter disabled is the reference then)."""
    if reference_free or (models.reference_path is None and models.lora.enabled):
        return None
    path, role = models.reference_path, "models.reference_path"
    if path is None:
        path, role = models.path, "the reference (models.path)"
    return freeze(Actor.from_pretrained(path, tokenizer, models.frozen(), role=role, frozen=True))


def shard_policy(actor: Actor, reference: Actor | None, mesh: Any, precision: str | None) -> None:
    """FSDP2 over the data-parallel mesh: the policy and a separate reference, sharded per decoder layer."""
    data_parallel, policy = fsdp2_setup(mesh, precision)
    for wrapper in (actor, reference):
        if wrapper is not None:
            shard_model(wrapper.model, data_parallel, policy)


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
def reference_answer_log_probs(actor: Actor, reference: Actor | None, batch: dict[str, Tensor]) -> AnswerLogProbs:
    """:func:`answer_log_probs` of the reference model, or of the policy with its LoRA adapter disabled."""
    if reference is not None:
        return answer_log_probs(reference, batch)
    with actor.adapter_disabled():
        return answer_log_probs(actor, batch)


def row_key(ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> bytes:
    """A 128-bit digest of a row's tokens and labels: the same answer in any batch has the same key."""
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
