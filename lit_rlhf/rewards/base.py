"""What a reward component receives, how its result is checked, and how components are combined.

A component scores a :class:`RewardBatch` (prompts, responses, the rows' dataset columns, and the
actor's token ids) with one float per response. Several components make a weighted sum; async
components are awaited concurrently, so a reward that calls a sandbox or an API never serialises
the batch behind another one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_rlhf.settings import LoadSettings, import_object

# keys reserved by the metrics of the summed reward (reward/score, reward/mean, reward/std)
RESERVED_NAMES = ("score", "mean", "std")


class RewardError(ValueError):
    """A reward raised, timed out, or returned something other than one finite float per response."""


class RewardBatch:
    """``B`` responses to score and everything a reward may read about them.

    Args:
        prompts: each row's prompt as the policy saw it (chat template applied), repeated for the
            samples of a prompt.
        responses: the decoded responses (special tokens skipped), or a callable that decodes them
            on first use (the reward-model fast path never needs the text).
        columns: every other field of each row's prompt record (e.g. ``answer``), one entry per row.
        sequences: ``[B, P+A]`` the actor's token ids (left-padded prompt, right-padded response),
            or None when the batch comes from text only.
        attention_mask: ``[B, P+A]`` 1 for prompt tokens and response tokens up to the first EOS.
    """

    def __init__(
        self,
        prompts: list[str],
        responses: list[str] | Callable[[], list[str]],
        columns: dict[str, list] | None = None,
        sequences: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> None:
        self.prompts = prompts
        self._responses = responses
        self.columns = columns or {}
        self.sequences, self.attention_mask = sequences, attention_mask
        for name, values in self.columns.items():
            if len(values) != len(prompts):
                raise ValueError(f"column {name!r} has {len(values)} entries for {len(prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def responses(self) -> list[str]:
        return self._responses() if callable(self._responses) else self._responses

    def sample(self, i: int) -> tuple[str, str]:
        """Row ``i``'s prompt and response, for error messages."""
        return self.prompts[i], self.responses[i]


class RewardComponent(nn.Module):
    """Base class of reward components: ``weight * score(batch)`` enters the summed reward.

    Subclasses implement :meth:`score` (plain or ``async def``) and, if they hold models,
    :meth:`setup`, which runs once before the first score (at model set-up, or on first use when a
    ``compute_reward`` override calls the components itself).

    Args:
        weight: the component's weight in the sum.
        name: the name in metrics (``reward/<name>``) and errors; a default comes from the component.
    """

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"reward weight must be a finite number, got {weight!r}")
        if name is not None and (not name or name in RESERVED_NAMES or "/" in name):
            raise ValueError(f"reward name {name!r} is empty, contains '/', or is one of {RESERVED_NAMES}")
        self.weight, self._name = float(weight), name
        self.is_set_up = False

    @property
    def name(self) -> str:
        return self._name or self.default_name()

    def default_name(self) -> str:
        return type(self).__name__.lower()

    def setup(self, tokenizer: Any, load: LoadSettings) -> None:
        """Load whatever the component needs (nothing by default).

        Args:
            tokenizer: the actor's tokenizer (a reward model compares its own with it).
            load: how the PPO models are loaded (dtype, attention, 4-bit); frozen models use
                ``load.frozen()``.
        """

    def ensure_setup(self, tokenizer: Any, load: LoadSettings) -> None:
        if not self.is_set_up:
            self.setup(tokenizer, load)
            self.is_set_up = True

    def score(self, batch: RewardBatch) -> Tensor | Sequence[float]:
        """One score per response of ``batch`` (``Tensor[B]`` or ``B`` floats), or an awaitable of it."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(batch)")

    def to_config(self) -> dict:
        """``{class_path, init_args}`` that rebuild this component (for checkpoints and loggers)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.init_args()}

    def init_args(self) -> dict:
        return {"weight": self.weight, "name": self._name}


def accepted_columns(fn: Callable, columns: dict[str, list]) -> dict[str, list]:
    """The columns ``fn`` accepts: all of them if it takes ``**kwargs``, else those it names."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature get prompts and responses only
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {k: v for k, v in columns.items() if k not in ("prompts", "responses")}
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in names and k not in ("prompts", "responses")}


def call_with_columns(fn: Callable, prompts: list[str], responses: list[str], columns: dict[str, list]) -> Any:
    """``fn(prompts, responses, **columns)`` with only the columns ``fn`` accepts."""
    return fn(prompts, responses, **accepted_columns(fn, columns))


def to_scores(value: Any, name: str, batch: RewardBatch, device: torch.device | str = "cpu") -> Tensor:
    """``value`` as a finite fp32 ``Tensor[B]``.

    Raises:
        RewardError: naming the reward ``name``, what it returned, and for a bad value the sample.
    """
    size = len(batch)
    expected = f"one float per response (a Tensor[{size}] or a list of {size} numbers)"
    if isinstance(value, Tensor):
        scores = value.detach().to(device=device, dtype=torch.float32)
    elif value is None or isinstance(value, str | bytes | Mapping):
        raise RewardError(f"reward {name} returned {type(value).__name__}; it must return {expected}")
    else:
        try:
            values = list(value)
        except TypeError:
            raise RewardError(f"reward {name} returned {type(value).__name__}; it must return {expected}") from None
        for i, v in enumerate(values):
            if isinstance(v, str | bytes) or v is None or not _is_number(v):
                prompt, response = batch.sample(i) if i < size else ("?", "?")
                raise RewardError(
                    f"reward {name} returned {v!r} ({type(v).__name__}) for sample {i} "
                    f"(prompt {prompt!r}, response {response!r}); it must return {expected}"
                )
        scores = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
    return check_scores(scores, name, size, batch.sample)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def check_scores(scores: Tensor, name: str, batch_size: int, sample: Callable[[int], tuple[str, str]]) -> Tensor:
    """Check that ``scores`` is a finite tensor of shape ``[batch_size]``.

    ``sample(i)`` gives the prompt and response of row ``i``; it is called only to describe a bad row.
    """
    if scores.shape != (batch_size,):
        raise RewardError(
            f"reward {name} returned shape {tuple(scores.shape)}; expected ({batch_size},): one score per response"
        )
    finite = torch.isfinite(scores)
    if not bool(finite.all()):  # one sync per scoring call
        i = int((~finite).nonzero()[0])
        prompt, response = sample(i)
        raise RewardError(
            f"reward {name} returned {scores[i].item()} for sample {i} "
            f"(prompt {prompt!r}, response {response!r}); rewards must be finite"
        )
    return scores


def score_components(
    components: Sequence[RewardComponent], batch: RewardBatch, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Each component's checked scores ``[B]``, by name; async components run concurrently."""
    results: dict[str, Any] = {}
    pending: dict[str, Any] = {}
    for component in components:
        try:
            out = component.score(batch)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward {component.name} raised {type(err).__name__}: {err}") from err
        (pending if inspect.isawaitable(out) else results)[component.name] = out
    if pending:
        outcomes = run_concurrently(list(pending.values()))
        for name, outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, RewardError):
                raise outcome
            if isinstance(outcome, BaseException):
                raise RewardError(f"reward {name} raised {type(outcome).__name__}: {outcome}") from outcome
            results[name] = outcome
    return {c.name: to_scores(results[c.name], c.name, batch, device) for c in components}


def run_concurrently(awaitables: list) -> list:
    """Await ``awaitables`` together; exceptions are returned in place of results.

    Inside a running event loop (a notebook) they run on a fresh loop in a helper thread.
    """

    async def gather() -> list:
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def as_components(rewards: Sequence[RewardComponent | Mapping] | None) -> list[RewardComponent]:
    """``rewards`` as components: instances as they are, ``{class_path, init_args}`` dicts built.

    Raises:
        TypeError: naming the entry that is neither.
    """
    components = []
    for i, entry in enumerate(rewards or []):
        if isinstance(entry, Mapping) and "class_path" in entry:
            cls = import_object(entry["class_path"], f"rewards[{i}].class_path")
            if not (isinstance(cls, type) and issubclass(cls, RewardComponent)):
                raise TypeError(f"rewards[{i}].class_path {entry['class_path']!r} is not a RewardComponent")
            entry = cls(**entry.get("init_args", {}))
        if not isinstance(entry, RewardComponent):
            raise TypeError(
                f"rewards[{i}] is {entry!r}; rewards are components: RewardFunction(fn), RewardModel(path) or "
                "RemoteReward(url) from lit_rlhf.rewards"
            )
        components.append(entry)
    return components
