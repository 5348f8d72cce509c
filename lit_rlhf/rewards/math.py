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

import atexit
import contextlib
import importlib.util
import json
import logging
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation

log = logging.getLogger(__name__)

# a number: thousands separated by commas (1,234,567) or plain digits, an optional decimal part
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER = re.compile(NUMBER)
# GSM8K's answer line: "#### 72" (a "$" and spaces allowed before the number), the number read as verl
# reads it: digits, commas and points, the commas dropped. One run of spaces at a time: two adjacent
# `\s*` around an optional "$" would backtrack quadratically on a long run of whitespace.
_HASHES = re.compile(r"####\s*(?:\$\s*)?(-?[\d,.]*\d[\d,.]*)")


def number(text: str) -> Decimal | None:
    """The finite value of a number as written (``1,234.50`` -> 1234.50), or None if it is not one."""
    try:
        value = Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None  # "nan", "inf" (a missing value read as a float)


def reference_number(answer: str) -> Decimal:
    """The reference's number: the number after a GSM8K solution's ``####``, or the whole answer."""
    if answer is None:
        raise ValueError("a reference answer is missing (None): every prompt record needs its answer")
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


def _check(responses: Sequence[str], answer: Sequence[str]) -> None:
    if isinstance(answer, str):
        raise TypeError(f"answer is one string ({answer[:40]!r}), not a reference answer per response")
    if len(responses) != len(answer):
        raise ValueError(f"{len(responses)} responses but {len(answer)} reference answers")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"response {i} is {type(response).__name__}, not a string")


def _grade(responses: Sequence[str], answer: Sequence[str], extract) -> list[float]:
    _check(responses, answer)
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
    if importlib.util.find_spec("math_verify") is None:  # a dependency of the package: a broken install
        raise ImportError("lit_rlhf.rewards.math.math_verify needs math-verify: pip install math-verify")
    _check(responses, answer)
    references = [_reference_text(reference) for reference in answer]
    # math-verify bounds its work with signal.alarm, which only a main thread may use. A RewardFunction
    # runs a plain function on a helper thread, so there each pair goes to a worker process that runs
    # math-verify on its own main thread, and one that still runs past its deadline is killed (score 0)
    grade = _grade_latex if threading.current_thread() is threading.main_thread() else _WORKER.grade
    scores = []
    for response, reference in zip(responses, references, strict=True):
        score = grade(response, reference)
        if score is None:
            raise ValueError(
                f"math-verify cannot parse the reference answer {reference!r}: write it as LaTeX or a number"
            )
        scores.append(score)
    return scores


def _reference_text(reference) -> str:
    if reference is None or (isinstance(reference, float) and reference != reference):
        raise ValueError(f"a reference answer is missing ({reference}): every prompt record needs its answer")
    return str(reference)


TIMEOUT_S = 5
"""math-verify's own deadline for each parse and for the comparison (on a main thread)."""


def _grade_latex(response: str, reference: str) -> float | None:
    """1.0 or 0.0, or None where the reference cannot be parsed (on a main thread: math-verify's timeouts)."""
    from math_verify import parse, verify

    with _quiet("math_verify"):
        latex = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
        gold = parse(latex, parsing_timeout=TIMEOUT_S)
        if not gold:
            return None
        predicted = parse(response, parsing_timeout=TIMEOUT_S)
        return float(bool(predicted) and verify(gold, predicted, timeout_seconds=TIMEOUT_S))


class _Worker:
    """A Python process that grades with math-verify on its main thread, one pair per JSON line.

    Started on first use and kept; a pair that takes longer than ``deadline_s`` (math-verify's own
    timeouts, three of them, plus slack) is scored 0.0 and its process killed, to be started again.
    """

    deadline_s = 4 * TIMEOUT_S
    start_deadline_s = 120.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None

    def grade(self, response: str, reference: str) -> float | None:
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            try:
                self.process.stdin.write(json.dumps([response, reference]) + "\n")
                self.process.stdin.flush()
                line = self._read_line(self.deadline_s)
            except (BrokenPipeError, OSError):
                line = None
            if line is None:  # past its deadline, or the process died: this pair scores 0
                self.stop()
                log.warning("math_verify: a response took over %.0f s to grade; scored 0.0", self.deadline_s)
                return 0.0
            result = json.loads(line)
            return None if result == "unparsable" else float(result)

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        if self._read_line(self.start_deadline_s) != '"ready"':
            self.stop()
            raise RuntimeError("math_verify: its grading process did not start (is math-verify installed?)")

    def _read_line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        return line.strip() if line else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def _serve() -> None:
    """The worker process's loop: a ``[response, reference]`` JSON line in, a score (or "unparsable") out."""
    logging.disable(logging.WARNING)
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        score = _grade_latex(*json.loads(line))
        print(json.dumps("unparsable" if score is None else score), flush=True)


# the worker loads this file alone (no package import: no torch, no lightning), then serves
_WORKER_SOURCE = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_lit_rlhf_math_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._serve()\n"
)
_WORKER = _Worker()
atexit.register(_WORKER.stop)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hold a logger's warnings (a response math-verify cannot parse scores 0; it need not warn)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
