"""Checks of preference pairs that teach nothing: equal answers, an empty chosen answer, pairs truncation made equal.

A pair whose chosen and rejected rows are the same tokens has a preference margin of exactly 0
whatever the model: the reward model's and DPO's losses are a constant ``log 2`` on it and its
accuracy is a coin flip, so it only dilutes the batch. Equal or empty answers in a file are data
bugs (a failed generation, a copied column) and stop the run naming the row; pairs that only
truncation made equal are dropped and counted, and too many of them is an error naming
``max_length``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.data.chat import DataError, Where, as_text, as_turns, is_conversation


def check_answers(chosen: Any, rejected: Any, chosen_where: Where, rejected_where: Where) -> None:
    """An answer pair must differ, and the chosen answer must say something.

    ``chosen``/``rejected`` are the answers after the prompt (strings or assistant messages);
    surrounding whitespace is ignored in both tests. An empty rejected answer is allowed: a policy
    sample that stopped at once is a real, worse answer.

    Raises:
        DataError: the chosen answer is empty, or equal to the rejected one (naming both fields).
    """
    chosen_key, rejected_key = _answer(chosen, chosen_where), _answer(rejected, rejected_where)
    if not any(content for _, content in chosen_key):
        raise DataError(f"{chosen_where}: the chosen answer is empty; a preferred answer must have text")
    if chosen_key == rejected_key:
        raise DataError(
            f"{rejected_where}: the rejected answer equals the chosen one (field {chosen_where.field!r}), so the pair "
            "teaches no preference; fix or remove the row"
        )


def _answer(value: Any, where: Where) -> tuple[tuple[str, str], ...]:
    """``(role, stripped content)`` of every turn of an answer (a string is one assistant turn)."""
    if not is_conversation(value):
        return (("assistant", as_text(value, where).strip()),)
    return tuple((m["role"], m["content"].strip()) for m in as_turns(value, where, "assistant"))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where ``a`` and ``b`` differ (one ending counts), or None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_identical(path: str, rows: list[tuple[int, int | None]], total: int, max_length: int, limit: float) -> None:
    """Warn about (or refuse) the pairs of ``path`` whose two rows are the same tokens after truncation.

    Args:
        path: the file, for the message.
        rows: ``(row, first differing position before truncation or None)`` of each identical pair.
        total: the file's number of pairs.
        max_length: the truncation length (``data.max_length``).
        limit: the largest share of identical pairs that is only a warning (``data.max_identical_fraction``).

    Raises:
        DataError: more than ``limit`` of the pairs (or all of them) are identical.
    """
    if not rows:
        return
    needed = [position + 1 for _, position in rows if position is not None]
    fix = f"data.max_length >= {max(needed)} keeps every pair apart" if needed else "their texts give the same tokens"
    shown = ", ".join(str(row) for row, _ in rows[:10]) + (", ..." if len(rows) > 10 else "")
    counted = (
        f"{path}: {len(rows)} of {total} preference pairs ({len(rows) / total:.1%}) have identical chosen and "
        f"rejected token ids after truncation to data.max_length={max_length} (rows {shown}; {fix})"
    )
    if len(rows) > limit * total or len(rows) == total:
        raise DataError(
            f"{counted}, more than data.max_identical_fraction={limit:g} of the pairs; raise data.max_length, "
            "shorten the prompts, or raise data.max_identical_fraction to drop them"
        )
    rank_zero_warn(f"{counted}; they are dropped from training (a pair of equal rows teaches nothing)")
