"""RewardFunction: a Python function (or its dotted path) as a reward component."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import Tensor

from lit_rlhf.rewards.base import RewardBatch, RewardComponent
from lit_rlhf.rewards.inputs import call_reward
from lit_rlhf.settings import import_object


def function_path(fn: Callable) -> str:
    """``package.module.name`` of a function (its qualified name if it cannot be imported back)."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class RewardFunction(RewardComponent):
    """A function ``fn(prompts, responses, **columns) -> Tensor[B] | Sequence[float]`` as a reward.

    ``columns`` holds every other field of each row's prompt record (e.g. ``answer``), one entry
    per row, repeated for the samples of a prompt. ``fn`` gets only the columns it names, or all
    of them if it takes ``**kwargs`` (then only those every row has); a column it names that a row
    lacks is an error naming the column, the file and the row. A function written for TRL's
    ``GRPOTrainer``, ``fn(completions, **kwargs)``, is called by keyword with what it names of
    ``prompts``, ``responses``, ``completions`` (TRL's: ``[{"role": "assistant", "content": text}]``
    for a chat-templated row, else the text) and ``prompt_messages`` (see
    ``lit_rlhf.rewards.inputs``). An ``async def`` function is awaited concurrently with the other
    async components; a plain one runs on a helper thread so that ``timeout_s`` bounds it too.

    Args:
        fn: ``package.module.function``, or (from Python) the function itself.
        weight: the component's weight in the summed reward.
        name: the name in metrics and errors (default: the function's name).
        timeout_s: seconds one call may take before the run stops with an error naming the function.
    """

    def __init__(
        self, fn: str | Callable, weight: float = 1.0, name: str | None = None, timeout_s: float = 300.0
    ) -> None:
        super().__init__(weight, name, timeout_s)
        self.fn = import_object(fn, "RewardFunction.fn") if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise ValueError(f"RewardFunction.fn {fn!r} is not callable")
        self.fn_path = fn if isinstance(fn, str) else function_path(fn)

    def default_name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def score(self, batch: RewardBatch) -> Tensor | Sequence[float]:
        return call_reward(self.fn, self.name, batch.inputs(), batch.columns)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def init_args(self) -> dict:
        return {"fn": self.fn_path, **super().init_args()}
