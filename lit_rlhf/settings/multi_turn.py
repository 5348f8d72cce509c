"""The ``rollout.multi_turn`` group: tools or an environment answer the policy between its turns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lit_rlhf.settings.common import _check, _choice

ObservationTruncate = Literal["left", "middle", "right"]
TurnRewards = Literal["sum", "last"]
TemplateCheck = Literal["strict", "warn", "off"]


@dataclass(frozen=True, kw_only=True)
class MultiTurnSettings:
    """Multi-turn rollouts (absent: single-turn). The policy writes a turn, the tools or the
    environment answer, and it goes on until it answers without a call, the environment says done,
    ``max_turns`` is reached or the response budget ``generation.max_new_tokens`` (tool and
    environment tokens count) is spent. Only the tokens the policy sampled are trained on."""

    tools: tuple[str, ...] = ()
    """tool functions (dotted paths, e.g. ``mypkg.tools.calculator``; from Python the functions): type
    hints and a Google-style docstring give their schemas, which the chat template renders into the prompt."""
    environment: str | None = None
    """an ``lit_rlhf.rollout.Environment`` subclass (dotted path; from Python the class), one instance
    per trajectory (neither tools nor an environment: every trajectory ends after its first turn)."""
    max_turns: int = 4
    """assistant turns per trajectory."""
    max_tool_calls: int | None = None
    """tool calls per trajectory (None: no limit besides max_turns)."""
    max_parallel_calls: int = 8
    """tool calls of one turn that run at the same time."""
    tool_timeout_s: float = 30.0
    """a tool call that takes longer becomes an error message the policy reads."""
    max_observation_tokens: int | None = None
    """each tool or environment message is cut to this many tokens (None: no cut)."""
    observation_truncate: ObservationTruncate = "right"
    """which part of an over-long message is cut away: its ``left`` (start), ``middle`` or ``right`` (end)."""
    turn_rewards: TurnRewards = "sum"
    """the environment's per-turn rewards (``Step.reward``): added to the sequence score (``sum``) or
    placed at each turn's last trainable token (``last``)."""
    template_check: TemplateCheck = "warn"
    """compare each trajectory's ids with the chat template's full rendering of its conversation:
    ``strict`` stops with the first difference, ``warn`` counts them (``rollout/template_mismatches``)."""

    def __post_init__(self) -> None:
        tools = (self.tools,) if isinstance(self.tools, str) or callable(self.tools) else tuple(self.tools or ())
        object.__setattr__(self, "tools", tools)
        if tools and self.environment is not None:
            raise ValueError(
                "rollout.multi_turn has tools and an environment: give one of them (tools: [mypkg.tools.calculator] "
                "or environment: mypkg.envs.MyEnv); an environment that calls tools runs them itself"
            )
        _check(self.max_turns >= 1, "rollout.multi_turn", "max_turns", self.max_turns, ">= 1")
        if self.max_tool_calls is not None:
            _check(self.max_tool_calls >= 1, "rollout.multi_turn", "max_tool_calls", self.max_tool_calls, ">= 1")
        _check(
            self.max_parallel_calls >= 1, "rollout.multi_turn", "max_parallel_calls", self.max_parallel_calls, ">= 1"
        )
        _check(self.tool_timeout_s > 0, "rollout.multi_turn", "tool_timeout_s", self.tool_timeout_s, "> 0")
        if self.max_observation_tokens is not None:
            value = self.max_observation_tokens
            _check(value >= 1, "rollout.multi_turn", "max_observation_tokens", value, ">= 1")
        _choice(self.observation_truncate, ("left", "middle", "right"), "rollout.multi_turn", "observation_truncate")
        _choice(self.turn_rewards, ("sum", "last"), "rollout.multi_turn", "turn_rewards")
        _choice(self.template_check, ("strict", "warn", "off"), "rollout.multi_turn", "template_check")

    def tool_functions(self) -> list[Callable]:
        """The tools, imported."""
        from lit_rlhf.plain_data import import_object

        return [t if callable(t) else import_object(t, "rollout.multi_turn.tools") for t in self.tools]

    def environment_class(self) -> Any:
        """The environment class, imported (None with tools)."""
        from lit_rlhf.plain_data import import_object

        if self.environment is None or isinstance(self.environment, type):
            return self.environment
        return import_object(self.environment, "rollout.multi_turn.environment")
