"""Verifiable math rewards: 1.0 where a response's final answer equals the reference ``answer``, else 0.0.

Each is a reward function (``fn(prompts, responses, answer, **columns) -> list[float]``) for
``RewardFunction``::

    rewards:
      - class_path: lit_rlhf.rewards.RewardFunction
        init_args: {fn: lit_rlhf.rewards.math.gsm8k_strict}

- ``gsm8k_strict``: the number after the response's last ``####`` (GSM8K's own answer format, as
  verl grades it): a response without one scores 0.
- ``gsm8k_flexible``: the last number anywhere in the response.
- ``math_verify``: Hugging Face's ``math-verify`` (boxed answers, LaTeX, fractions, intervals, sets),
  for MATH-style answers.

``answer`` is the reference: a number, a LaTeX expression, or a whole GSM8K solution (its number after
``####`` is taken). Numbers compare by value: ``1,000``, ``1000`` and ``1000.00`` are equal.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation

# a number: thousands separated by commas (1,234,567) or plain digits, an optional decimal part
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER = re.compile(NUMBER)
# GSM8K's answer line: "#### 72" (a "$" and spaces allowed before the number)
_HASHES = re.compile(r"####\s*\$?\s*(" + NUMBER + ")")


def number(text: str) -> Decimal | None:
    """The value of a number as written (``1,234.50`` -> 1234.50), or None if it is not one."""
    try:
        return Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None


def reference_number(answer: str) -> Decimal:
    """The reference's number: the number after a GSM8K solution's ``####``, or the whole answer."""
    text = str(answer)
    found = _HASHES.findall(text)
    value = number(found[-1]) if found else number(text)
    if value is None:
        raise ValueError(
            f"the reference answer {text[-80:]!r} is not a number (nor a GSM8K solution ending in '#### <number>'): "
            "the gsm8k rewards grade numbers; grade other answers with lit_rlhf.rewards.math.math_verify"
        )
    return value


def strict_answer(response: str) -> Decimal | None:
    """The number after the response's last ``####`` (None: it gives none)."""
    found = _HASHES.findall(response)
    return number(found[-1]) if found else None


def flexible_answer(response: str) -> Decimal | None:
    """The last number in the response (None: it has none)."""
    found = _NUMBER.findall(response)
    return number(found[-1]) if found else None


def _grade(responses: Sequence[str], answer: Sequence[str], extract) -> list[float]:
    if len(responses) != len(answer):
        raise ValueError(f"{len(responses)} responses but {len(answer)} reference answers")
    scores = []
    for response, reference in zip(responses, answer, strict=True):
        got = extract(response)
        scores.append(float(got is not None and got == reference_number(reference)))
    return scores


def gsm8k_strict(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[str], **columns) -> list[float]:
    """1.0 where the number after the response's last ``####`` equals the reference, else 0.0."""
    return _grade(responses, answer, strict_answer)


def gsm8k_flexible(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[str], **columns) -> list[float]:
    """1.0 where the last number in the response equals the reference, else 0.0."""
    return _grade(responses, answer, flexible_answer)


def math_verify(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[str], **columns) -> list[float]:
    """1.0 where ``math-verify`` finds the response's answer (a ``\\boxed{}`` one first, else the last
    expression) equal to the reference, else 0.0. A reference it cannot parse is an error."""
    try:
        from math_verify import parse, verify
    except ImportError as error:  # a dependency of the package; only a broken install lacks it
        raise ImportError("lit_rlhf.rewards.math.math_verify needs math-verify: pip install math-verify") from error
    if len(responses) != len(answer):
        raise ValueError(f"{len(responses)} responses but {len(answer)} reference answers")
    # math-verify bounds its work with signal.alarm, which only the main thread may use; elsewhere
    # (a RewardFunction runs a plain function on a helper thread) its timeouts are off, and the
    # component's own timeout_s bounds the call
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    scores = []
    with _quiet("math_verify"):
        for response, reference in zip(responses, answer, strict=True):
            text = str(reference)
            gold = parse(text if "$" in text or "\\boxed" in text else f"${text}$", parsing_timeout=timeout)
            if not gold:
                raise ValueError(
                    f"math-verify cannot parse the reference answer {text!r}: write it as LaTeX or a number"
                )
            predicted = parse(response, parsing_timeout=timeout)
            scores.append(float(bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)))
    return scores


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hold a logger's warnings (math-verify warns on every call whose timeout is off)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
