"""Environments: what answers the policy between its turns. ``ToolEnvironment`` runs tool calls.

An environment is one trajectory's counterpart: ``reset(**row)`` starts it from a prompt row's
columns (as reward components receive them; a returned prompt replaces the row's), ``step`` takes
the policy's assistant message and returns the messages it answers with, an optional reward for
the turn and whether the trajectory is done. ``reward()`` (optional) is the trajectory's own final
reward; ``close()`` frees what it holds. Any of them may be ``async``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lit_rlhf.rollout.multi_turn.tools import HermesToolParser, Toolbox, ToolCallParser

Message = dict[str, Any]  # {"role": ..., "content": ...}
# what the counters call a call that could not be read, and a call of a tool the run does not have
MALFORMED_CALL, UNKNOWN_TOOL = "<malformed>", "<unknown>"


@dataclass
class Step:
    """An environment's answer to one assistant turn.

    messages: what the policy reads next (tool results, a user turn), role/content dicts.
    reward: this turn's reward (None: none; ``turn_rewards`` says how turn rewards are used).
    done: the trajectory ends here (no observation is appended after this turn).
    """

    messages: list[Message] = field(default_factory=list)
    reward: float | None = None
    done: bool = False


class Environment(ABC):
    """Base of environments (one instance per trajectory). Subclasses implement ``step``."""

    def reset(self, **row: Any) -> str | list[Message] | None:
        """Start a trajectory from the prompt row's columns; a returned prompt replaces the row's (None: keep it)."""
        return None

    @abstractmethod
    def step(self, assistant_message: str) -> Step:
        """Answer the policy's assistant turn (its decoded text)."""

    def reward(self) -> float | None:
        """The trajectory's final reward from the environment (None: none)."""
        return None

    def close(self) -> None:
        """Free what the trajectory held."""
        return None


class ToolEnvironment(Environment):
    """The built-in environment of ``rollout.multi_turn.tools``: runs the calls of each assistant turn.

    A turn without a tool call ends the trajectory (the policy answered). Each call's result is a
    ``tool`` message; malformed calls, unknown tools, wrong arguments and raising tools give an
    ``error: ...`` tool message instead and are counted in ``errors`` (by tool name, ``<unknown>`` for a
    tool the run does not have, ``<malformed>`` for a call that could not be read). Past
    ``max_tool_calls`` the trajectory ends.

    Args:
        tools: the tool functions, or a shared :class:`Toolbox`.
        parser: reads the calls from the policy's text (default Hermes/Qwen ``<tool_call>`` JSON).
        max_tool_calls: calls per trajectory (None: no limit).
    """

    def __init__(
        self,
        tools: Sequence[Callable] | Toolbox,
        parser: ToolCallParser | None = None,
        max_tool_calls: int | None = None,
    ) -> None:
        self.toolbox = tools if isinstance(tools, Toolbox) else Toolbox(tools)
        self.parser = parser or HermesToolParser()
        self.max_tool_calls = max_tool_calls
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def reset(self, **row: Any) -> None:
        self.calls, self.errors, self.seconds = Counter(), Counter(), Counter()
        return None

    @property
    def num_calls(self) -> int:
        return sum(self.calls.values())

    async def step(self, assistant_message: str) -> Step:
        """The tool messages answering the turn's calls; done when the turn has none, or when the
        trajectory already made ``max_tool_calls`` calls (further calls are not run)."""
        parsed = self.parser.parse(assistant_message)
        remaining = None if self.max_tool_calls is None else self.max_tool_calls - self.num_calls
        if not parsed.any or remaining == 0:
            return Step(done=True)
        messages: list[Message] = []
        for error in parsed.errors:
            self.calls[MALFORMED_CALL] += 1
            self.errors[MALFORMED_CALL] += 1
            messages.append({"role": "tool", "name": MALFORMED_CALL, "content": f"error: {error}"})
        calls = parsed.calls if remaining is None else parsed.calls[: max(0, remaining - len(parsed.errors))]
        for result in await self.toolbox.run(calls):
            counted = result.name if result.name in self.toolbox.tools else UNKNOWN_TOOL  # names stay a known set
            self.calls[counted] += 1
            if result.error:
                self.errors[counted] += 1
            self.seconds[counted] += result.seconds
            messages.append({"role": "tool", "name": result.name, "content": result.content})
        return Step(messages)
