"""What a reward component receives, how its result is checked, and how components are combined.

A component scores a :class:`RewardBatch` (prompts, responses, the rows' dataset columns, and the
actor's token ids) with one float per response. Several components make a weighted sum; async
components are awaited concurrently, so a reward that calls a sandbox or an API never serialises
the batch behind another one.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_rlhf.rewards.deadline import DeadlinePassed, LoopBlocked, await_with_deadlines, run_in_thread, timeout_message
from lit_rlhf.rewards.inputs import completions_of
from lit_rlhf.settings import LoadSettings, import_object

log = logging.getLogger(__name__)

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
        columns: every other field of each row's prompt record (e.g. ``answer``), one entry per row
            (a :class:`~lit_rlhf.rewards.inputs.MissingColumn` where a row's record lacks it). A
            ``prompt_messages`` entry (as ``PromptDataModule`` sends it) is taken out into
            :attr:`prompt_messages`.
        sequences: ``[B, P+A]`` the actor's token ids (left-padded prompt, right-padded response),
            or None when the batch comes from text only.
        attention_mask: ``[B, P+A]`` 1 for prompt tokens and response tokens up to the first EOS.
        prompt_messages: each row's messages before the chat template (with the system prompt if
            one was added), or None for a row rendered without a template; None: no row has any.
        completions: each row's completion as messages (a multi-turn row's assistant and tool turns);
            None: the response as one assistant message (TRL's form).
    """

    def __init__(
        self,
        prompts: list[str],
        responses: list[str] | Callable[[], list[str]],
        columns: dict[str, list] | None = None,
        sequences: Tensor | None = None,
        attention_mask: Tensor | None = None,
        prompt_messages: list[list[dict] | None] | None = None,
        completions: list | None = None,
    ) -> None:
        self.prompts = prompts
        self._completions = completions
        self._responses = responses
        columns = dict(columns or {})
        carried = columns.pop("prompt_messages", None)
        self.prompt_messages = prompt_messages if prompt_messages is not None else carried
        if self.prompt_messages is None:
            self.prompt_messages = [None] * len(prompts)
        self.columns = columns
        self.sequences, self.attention_mask = sequences, attention_mask
        for name, values in {**self.columns, "prompt_messages": self.prompt_messages}.items():
            if len(values) != len(prompts):
                raise ValueError(f"column {name!r} has {len(values)} entries for {len(prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def responses(self) -> list[str]:
        return self._responses() if callable(self._responses) else self._responses

    @property
    def completions(self) -> list:
        """TRL's completions: ``[{"role": "assistant", "content": response}]`` per conversational row, else the
        text; a multi-turn row's every turn after the prompt (assistant and tool messages)."""
        if self._completions is not None:
            return self._completions
        return completions_of(self.responses, self.prompt_messages)

    def inputs(self) -> dict[str, list]:
        """What a reward function may ask for by name besides the columns (see ``lit_rlhf.rewards.inputs``)."""
        return {
            "prompts": self.prompts,
            "responses": self.responses,
            "completions": self.completions,
            "prompt_messages": self.prompt_messages,
        }

    def columns_with_messages(self) -> dict[str, list]:
        """The columns plus ``prompt_messages``: what a ``compute_reward`` override gets and passes on."""
        return {**self.columns, "prompt_messages": self.prompt_messages}

    def copy(self) -> RewardBatch:
        """A batch of its own for one component: its edits of texts, columns or tensors reach no other one.

        The responses are copied when first read, so the reward-model fast path still never decodes.
        """
        return RewardBatch(
            copy.deepcopy(self.prompts),
            lambda: copy.deepcopy(self.responses),
            copy.deepcopy(self.columns),
            None if self.sequences is None else self.sequences.clone(),
            None if self.attention_mask is None else self.attention_mask.clone(),
            copy.deepcopy(self.prompt_messages),
            copy.deepcopy(self._completions),
        )

    def sample(self, i: int) -> tuple[str, str]:
        """Row ``i``'s prompt and response, for error messages."""
        return self.prompts[i], self.responses[i]


class RewardComponent(nn.Module):
    """Base class of reward components: ``weight * score(batch)`` enters the summed reward.

    Subclasses implement :meth:`score` (plain or ``async def``) and, if they hold models,
    :meth:`setup`, which runs once before the first score (at model set-up, or on first use when a
    ``compute_reward`` override calls the components itself).

    Every call has a total deadline, ``timeout_s``: a component that has not returned its scores by
    then ends the run with a :class:`RewardError` naming it and the setting. A sync ``score`` runs
    on a helper thread the trainer stops waiting for (``score_on_thread``); an async one is cancelled.

    Args:
        weight: the component's weight in the sum.
        name: the name in metrics (``reward/<name>``) and errors; a default comes from the component.
        timeout_s: seconds one call (a whole batch) may take before the run stops with an error.
    """

    # False keeps a sync score on the trainer's thread (its deadline is then checked once it returns)
    score_on_thread: bool = True

    def __init__(self, weight: float = 1.0, name: str | None = None, timeout_s: float = 300.0) -> None:
        super().__init__()
        if not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"reward weight must be a finite number, got {weight!r}")
        if name is not None and (not name or name in RESERVED_NAMES or "/" in name):
            raise ValueError(f"reward name {name!r} is empty, contains '/', or is one of {RESERVED_NAMES}")
        if not isinstance(timeout_s, int | float) or not timeout_s > 0 or not math.isfinite(timeout_s):
            raise ValueError(f"reward timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        self.weight, self._name, self.timeout_s = float(weight), name, float(timeout_s)
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

    @property
    def is_async(self) -> bool:
        """Whether :meth:`score` returns an awaitable (awaited concurrently with the other async components)."""
        return inspect.iscoroutinefunction(self.score)

    def timeout_detail(self) -> str:
        """Words added to the time-out error (e.g. the URL and the last error of a remote reward)."""
        return ""

    def to_config(self) -> dict:
        """``{class_path, init_args}`` that rebuild this component (for checkpoints and loggers)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.init_args()}

    def init_args(self) -> dict:
        return {"weight": self.weight, "name": self._name, "timeout_s": self.timeout_s}


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


REWARD_SCALE_WARNING = 100.0  # |score| above which a run without normalisation or clipping is warned


def warn_large_scores(scores: Tensor, limit: float = REWARD_SCALE_WARNING) -> bool:
    """Warn when a score's magnitude passes ``limit`` (the critic's value loss grows with its square and
    a KL penalty is dwarfed); returns whether it warned, so that a run warns once."""
    largest = float(scores.abs().max()) if scores.numel() else 0.0
    if largest <= limit:
        return False
    log.warning(
        "reward scores reach %.3g in magnitude (reward/score): the critic's value loss grows with their square "
        "and PPO's KL penalty is dwarfed. Normalise them (RewardModel(normalize=true), or scale your "
        "function) or set algorithm.reward_clip.",
        largest,
    )
    return True


def score_components(
    components: Sequence[RewardComponent], batch: RewardBatch, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Each component's checked scores ``[B]``, by name, each within its ``timeout_s``.

    Sync components run one after the other, async ones concurrently; each gets its own copy of
    the batch. Whatever a component raises becomes a :class:`RewardError` naming it.
    """
    results: dict[str, Any] = {}
    pending: dict[str, Any] = {}
    try:
        for component in components:
            out = start_score(component, batch.copy())
            (pending if inspect.isawaitable(out) else results)[component.name] = out
    except BaseException:
        for awaitable in pending.values():
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never awaited: close it rather than warn about it
        raise
    if pending:
        by_name = {c.name: c for c in components}
        outcomes = await_with_deadlines(pending, {name: by_name[name].timeout_s for name in pending})
        for name, outcome in outcomes.items():
            results[name] = outcome
            if isinstance(outcome, BaseException):
                error = as_reward_error(by_name[name], outcome)
                raise error from (None if error is outcome or isinstance(outcome, DeadlinePassed) else outcome)
    return {c.name: to_scores(results[c.name], c.name, batch, device) for c in components}


def start_score(component: RewardComponent, batch: RewardBatch) -> Any:
    """``component.score(batch)``: its scores, or for an async component the awaitable of them."""
    try:
        if component.is_async:  # calling it only makes the awaitable
            return component.score(batch)
        if component.score_on_thread:
            return run_in_thread(lambda: component.score(batch), component.timeout_s, component.name)
        start = time.monotonic()
        out = component.score(batch)
        if time.monotonic() - start > component.timeout_s:
            raise DeadlinePassed(component.timeout_s)
        return out
    except BaseException as err:
        error = as_reward_error(component, err)
        if error is err:
            raise
        raise error from (None if isinstance(err, DeadlinePassed) else err)


def as_reward_error(component: RewardComponent, err: BaseException) -> BaseException:
    """``err`` as a :class:`RewardError` naming the component (interrupts pass through as they are)."""
    if isinstance(err, RewardError) or not isinstance(err, Exception):
        return err
    if isinstance(err, DeadlinePassed):
        blocked = " (its event loop stayed blocked: an async reward makes a blocking call)"
        detail = component.timeout_detail() + (blocked if isinstance(err, LoopBlocked) else "")
        return RewardError(timeout_message(component.name, component.timeout_s, detail))
    return RewardError(f"reward {component.name} raised {type(err).__name__}: {err}")


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
