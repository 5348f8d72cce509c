"""What a reward function is called with: the texts of each row, its messages, and its dataset columns.

Two ways to write a reward function, told apart by its parameter names:

- ``fn(prompts, responses, **columns)`` (lit_rlhf's own): called with the prompts and responses
  as the first two arguments and the dataset columns it names (all of them with ``**columns``);
- TRL's ``fn(completions, **kwargs)``: a function that names ``completions`` or ``prompt_messages``,
  or takes nothing but ``**kwargs``, is called by keyword with every input it asks for, as TRL's
  ``GRPOTrainer`` calls its reward functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

# inputs a function may ask for by name (besides the dataset columns)
INPUTS = ("prompts", "responses", "completions", "prompt_messages")
# naming one of these selects the keyword call (TRL's convention)
KEYWORD_INPUTS = ("completions", "prompt_messages")


class MissingColumn:
    """Stands for a dataset column that one row's record lacks (never passed to a reward as None).

    Args:
        name: the column.
        path: the data file the row comes from.
        row: the row in that file (1-based; a JSONL file's line).
    """

    __slots__ = ("name", "path", "row")

    def __init__(self, name: str, path: str, row: int) -> None:
        self.name, self.path, self.row = name, path, row

    def __repr__(self) -> str:
        return f"<missing {self.name!r}: {self.path}, row {self.row}>"

    def __deepcopy__(self, memo: dict) -> MissingColumn:
        return self


def first_missing(values: list) -> tuple[int, MissingColumn] | None:
    """``(batch index, marker)`` of the first row that lacks this column, or None when every row has it."""
    return next(((i, v) for i, v in enumerate(values) if isinstance(v, MissingColumn)), None)


def missing_column_error(reward: str, name: str, values: list) -> str | None:
    """The message for a reward that reads column ``name`` which some row lacks (None when all have it)."""
    found = first_missing(values)
    if found is None:
        return None
    i, marker = found
    return (
        f"reward {reward} reads the column {name!r}, but {marker.path}, row {marker.row} has no field {name!r} "
        f"(row {i} of the batch); give every record of the data file that field, or stop reading it"
    )


def completions_of(responses: list[str], prompt_messages: list[list[dict] | None]) -> list:
    """TRL's ``completions``: ``[{"role": "assistant", "content": text}]`` for a conversational row, else the text."""
    return [
        [{"role": "assistant", "content": text}] if messages is not None else text
        for text, messages in zip(responses, prompt_messages, strict=True)
    ]


def _parameters(fn: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature get prompts and responses only
        return None


def is_keyword_style(fn: Callable) -> bool:
    """Whether ``fn`` is called TRL's way: by keyword, with the inputs it names."""
    parameters = _parameters(fn) or []
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters)
    return bool(named & set(KEYWORD_INPUTS)) or (takes_kwargs and not positional)


def accepted_columns(fn: Callable, columns: dict[str, list]) -> dict[str, list]:
    """The columns ``fn`` accepts: those it names, or with ``**kwargs`` every column all rows have."""
    parameters = _parameters(fn)
    if parameters is None:
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        # a column some rows lack is left out (a read then fails naming it) rather than passed with holes
        return {k: v for k, v in columns.items() if k not in ("prompts", "responses") and first_missing(v) is None}
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in names and k not in ("prompts", "responses")}


def check_columns(reward: str, passed: dict[str, list]) -> None:
    """Raise when a column passed to a reward has a row that lacks it.

    Raises:
        RewardError: naming the reward, the column, the data file and the row.
    """
    from lit_rlhf.rewards.base import RewardError

    for name, values in passed.items():
        message = missing_column_error(reward, name, values)
        if message is not None:
            raise RewardError(message)


def explain_key_error(reward: str, err: KeyError, columns: dict[str, list]) -> str | None:
    """For a ``**kwargs`` function's ``kwargs[name]`` on a column that some rows lack: the message naming it."""
    name = err.args[0] if err.args else None
    return missing_column_error(reward, name, columns[name]) if isinstance(name, str) and name in columns else None


def call_reward(fn: Callable, reward: str, inputs: dict[str, Any], columns: dict[str, list]) -> Any:
    """Call ``fn`` the way its signature asks for (see the module docstring).

    Args:
        fn: the reward function.
        reward: its name, for errors.
        inputs: ``prompts``, ``responses``, ``completions`` and ``prompt_messages``, one entry per row.
        columns: the dataset columns, one entry per row (:class:`MissingColumn` where a row lacks one).

    Raises:
        RewardError: a column it reads that a row lacks, or a column that shadows an input's name.
    """
    from lit_rlhf.rewards.base import RewardError

    passed = accepted_columns(fn, columns)
    check_columns(reward, passed)
    if not is_keyword_style(fn):
        call = lambda: fn(inputs["prompts"], inputs["responses"], **passed)  # noqa: E731
    else:
        clash = sorted(set(passed) & set(INPUTS))
        if clash:
            raise RewardError(f"reward {reward}: the data's column {clash[0]!r} has a reward input's name; rename it")
        parameters = _parameters(fn) or []
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters)
        asked = inputs if takes_kwargs else {k: v for k, v in inputs.items() if k in {p.name for p in parameters}}
        call = lambda: fn(**asked, **passed)  # noqa: E731
    try:
        return call()
    except KeyError as err:
        message = explain_key_error(reward, err, columns)
        if message is None:
            raise
        raise RewardError(message) from err


def call_with_columns(fn: Callable, prompts: list[str], responses: list[str], columns: dict[str, list]) -> Any:
    """``fn(prompts, responses, **columns)`` with only the columns ``fn`` accepts.

    Raises:
        RewardError: a column ``fn`` names that some row lacks.
    """
    passed = accepted_columns(fn, columns)
    check_columns(getattr(fn, "__qualname__", type(fn).__name__), passed)
    return fn(prompts, responses, **passed)
