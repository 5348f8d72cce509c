"""The turn loop: the engine samples a turn for every row still going, the environments answer
(concurrently), the answers join each trajectory as observation tokens, until every row is done."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lit_rlhf.data.prompts import MESSAGES_COLUMN
from lit_rlhf.rollout.engines.base import GenerationRequest, RolloutEngine, Sample
from lit_rlhf.rollout.multi_turn.environment import (
    MALFORMED_CALL,
    UNKNOWN_TOOL,
    Environment,
    Message,
    Step,
    ToolEnvironment,
)
from lit_rlhf.rollout.multi_turn.tokens import TemplateError, Trajectory, check_renders_tools
from lit_rlhf.rollout.multi_turn.tools import Toolbox
from lit_rlhf.seeds import turn_seed
from lit_rlhf.settings import GenerationSettings, MultiTurnSettings

log = logging.getLogger(__name__)


class SingleTurn(Environment):
    """No environment: a trajectory ends after its first turn (``max_turns: 1`` is the single-turn rollout)."""

    def step(self, assistant_message: str) -> Step:
        return Step(done=True)


def run_coroutine(make: Callable[[], Any]) -> Any:
    """``asyncio.run(make())``; under a running event loop (a notebook) on a thread of its own, in the
    caller's grad mode (thread-local in torch)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    import torch

    box: dict[str, Any] = {}
    grad = torch.is_grad_enabled()

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = asyncio.run(make())
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name="multi-turn rollout", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass
class TrajectoryResult:
    """One row's trajectory and what the rewards and the logs read about it.

    sample: the whole response (turns and observations) with its trainable mask.
    trajectory: the ids and messages, turn by turn.
    response: the final assistant turn's text. completion: the messages after the prompt.
    environment_reward: the turn rewards' sum plus the environment's final reward (None: none).
    turn_rewards: each turn's ``Step.reward`` (None where it gave none), in turn order.
    turn_ends: the position, in the response, of each turn's last sampled token.
    truncated: ended by the token budget (an observation rolled back, or a turn cut).
    template_mismatch: the first difference from the chat template's full rendering, if any.
    """

    sample: Sample
    trajectory: Trajectory
    response: str
    completion: list[Message]
    environment_reward: float | None
    turn_rewards: list[float | None]
    turn_ends: list[int]
    truncated: bool
    template_mismatch: str | None = None
    tool_calls: Counter = field(default_factory=Counter)
    tool_errors: Counter = field(default_factory=Counter)
    tool_seconds: Counter = field(default_factory=Counter)


class TurnLoop:
    """Runs the multi-turn trajectories of a batch of rows with one engine.

    Args:
        settings: the ``rollout.multi_turn`` group.
        engine: the rollout engine (called once per turn with every row still going).
        tokenizer: the actor's (its chat template renders the conversation and the tools).
        generation: the sampling settings; ``max_new_tokens`` is each trajectory's whole response
            budget, tool and environment tokens included.
    """

    def __init__(
        self, settings: MultiTurnSettings, engine: RolloutEngine, tokenizer: Any, generation: GenerationSettings
    ) -> None:
        self.settings, self.engine, self.tokenizer, self.generation = settings, engine, tokenizer, generation
        tools = settings.tool_functions()
        self.toolbox = Toolbox(tools, settings.tool_timeout_s, settings.max_parallel_calls) if tools else None
        self.schemas = self.toolbox.schemas if self.toolbox is not None else None
        if self.schemas:
            check_renders_tools(tokenizer, self.schemas)
        self.environment_class = settings.environment_class()

    @property
    def tool_names(self) -> tuple[str, ...]:
        """The names the tool counters use: the run's tools, then malformed calls and unknown tools."""
        if self.toolbox is None:
            return ()
        return (*self.toolbox.tools, MALFORMED_CALL, UNKNOWN_TOOL)

    def make_environment(self) -> Environment:
        if self.toolbox is not None:
            return ToolEnvironment(self.toolbox, max_tool_calls=self.settings.max_tool_calls)
        if self.environment_class is not None:
            return self.environment_class()
        return SingleTurn()

    def run(
        self,
        messages: Sequence[list[Message]],
        columns: Sequence[dict[str, Any]],
        prompt_ids: Sequence[Sequence[int]],
        seeds: Sequence[int],
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[TrajectoryResult]:
        """One trajectory per row: its messages, its dataset columns (``reset`` gets them), the
        prompt's ids (used when no tool schemas change the rendered prompt; empty: rendered from the
        messages) and its seed."""
        return run_coroutine(lambda: self._run(messages, columns, prompt_ids, seeds, on_token))

    async def _run(self, messages, columns, prompt_ids, seeds, on_token) -> list[TrajectoryResult]:
        if self.settings.max_turns == 1:  # exactly the single-turn rollout's one generate call
            return await self._turns(messages, columns, prompt_ids, seeds, on_token)
        with self.engine.prefix_cache():  # each turn continues the last one's rows
            return await self._turns(messages, columns, prompt_ids, seeds, on_token)

    async def _turns(self, messages, columns, prompt_ids, seeds, on_token) -> list[TrajectoryResult]:
        budget, settings = self.generation.max_new_tokens, self.settings
        envs = [self.make_environment() for _ in messages]
        starts = await asyncio.gather(*(_maybe(env.reset(**row)) for env, row in zip(envs, columns, strict=True)))
        trajectories = []
        for start, conversation, ids in zip(starts, messages, prompt_ids, strict=True):
            if isinstance(start, str):
                start = [{"role": "user", "content": start}]
            conversation = list(start or conversation)
            keep_ids = start is None and self.schemas is None and bool(ids)  # the prompt the data module rendered
            trajectories.append(Trajectory(self.tokenizer, conversation, self.schemas, ids if keep_ids else None))
        n = len(trajectories)
        done, truncated, last_finish = [False] * n, [False] * n, ["length"] * n
        turn_rewards: list[list[float | None]] = [[] for _ in range(n)]
        turn_ends: list[list[int]] = [[] for _ in range(n)]
        for turn in range(settings.max_turns):
            active = [i for i in range(n) if not done[i]]
            if not active:
                break
            requests = [
                GenerationRequest(
                    tuple(trajectories[i].ids),
                    turn_seed(seeds[i], turn),
                    tuple(self.generation.stop_token_ids),
                    budget - len(trajectories[i].response_ids),
                )
                for i in active
            ]
            samples = self.engine.generate(requests, self.generation, on_token)
            texts = {}
            for i, sample in zip(active, samples, strict=True):
                texts[i] = trajectories[i].add_turn(sample.token_ids, sample.log_probs)
                turn_ends[i].append(len(trajectories[i].response_ids) - 1)
                last_finish[i] = sample.finish_reason
                if sample.finish_reason == "length":  # the budget is spent mid-turn
                    done[i] = truncated[i] = True
            going = [i for i in active if not done[i]]
            if turn == settings.max_turns - 1:
                for i in going:
                    done[i] = True
                going = []
            steps = await asyncio.gather(*(_maybe(envs[i].step(texts[i])) for i in going))
            for i, step in zip(going, steps, strict=True):
                turn_rewards[i].append(step.reward)
                if step.done or not step.messages:
                    done[i] = True
                    continue
                observation = [self._cut(message) for message in step.messages]
                ids = trajectories[i].observation_ids(observation)
                if len(trajectories[i].response_ids) + len(ids) >= budget:  # no room for the observation and a turn
                    done[i] = truncated[i] = True
                    continue
                trajectories[i].add_observation(observation, ids)
        finals = await asyncio.gather(*(_maybe(env.reward()) for env in envs))
        await asyncio.gather(*(_maybe(env.close()) for env in envs))
        results = []
        for i, (trajectory, env, final) in enumerate(zip(trajectories, envs, finals, strict=True)):
            rewards = [r for r in turn_rewards[i] if r is not None]
            environment_reward = None
            if rewards or final is not None:
                summed = sum(rewards) if settings.turn_rewards == "sum" else 0.0
                environment_reward = float(summed + (final or 0.0))
            finish = "stop" if last_finish[i] == "stop" and not truncated[i] else "length"
            ends = turn_ends[i]
            results.append(
                self._result(trajectory, env, finish, environment_reward, turn_rewards[i], ends, truncated[i])
            )
        return results

    def _result(
        self, trajectory, env, finish, environment_reward, turn_rewards, turn_ends, truncated
    ) -> TrajectoryResult:
        mismatch = None
        if self.settings.template_check != "off":
            mismatch = trajectory.check()
            if mismatch is not None and self.settings.template_check == "strict":
                raise TemplateError(
                    f"a trajectory's ids do not render as the chat template renders its conversation: {mismatch} "
                    "(rollout.multi_turn.template_check: warn counts these instead)"
                )
        sample = Sample(
            tuple(trajectory.response_ids), tuple(trajectory.log_probs), finish, tuple(trajectory.loss_mask)
        )
        final_turn = next((m["content"] for m in reversed(trajectory.messages) if m["role"] == "assistant"), "")
        result = TrajectoryResult(
            sample,
            trajectory,
            final_turn,
            trajectory.messages[trajectory.prompt_messages :],
            environment_reward,
            turn_rewards,
            turn_ends,
            truncated,
            mismatch,
        )
        if isinstance(env, ToolEnvironment):
            result.tool_calls, result.tool_errors, result.tool_seconds = env.calls, env.errors, env.seconds
        return result

    def _cut(self, message: Message) -> Message:
        """A message whose content is cut to ``max_observation_tokens`` tokens (the setting's side)."""
        limit = self.settings.max_observation_tokens
        content = message.get("content")
        if limit is None or not isinstance(content, str):
            return message
        ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return message
        side = self.settings.observation_truncate
        if side == "right":
            kept = ids[:limit]
        elif side == "left":
            kept = ids[-limit:]
        else:
            head = limit // 2
            kept = ids[:head] + ids[len(ids) - (limit - head) :]
        return {**message, "content": self.tokenizer.decode(kept)}


def conversations(input_ids: Any, attention_mask: Any, texts: list[str], columns: dict[str, list]):
    """Each row's messages (the chat data's, or the prompt text as one user turn), its other columns and
    its prompt ids: what the turn loop starts every trajectory from."""
    messages = columns.get(MESSAGES_COLUMN) or [None] * len(texts)
    rows = [{name: values[i] for name, values in columns.items() if name != MESSAGES_COLUMN} for i in range(len(texts))]
    starts = [m if m is not None else [{"role": "user", "content": t}] for m, t in zip(messages, texts, strict=True)]
    lengths = attention_mask.sum(-1).tolist()
    prompt_ids = [ids[len(ids) - k :] for ids, k in zip(input_ids.tolist(), lengths, strict=True)]
    return starts, rows, prompt_ids


def turn_inputs(trajectories: list[TrajectoryResult], device: Any) -> tuple[list[str], list, Any]:
    """What the rewards read of a multi-turn rollout: each row's final assistant text, its completion
    messages and the environments' rewards ``[B]`` (None when no environment gave one)."""
    import torch

    rewards = [t.environment_reward for t in trajectories]
    environment = None
    if any(r is not None for r in rewards):
        environment = torch.tensor([r or 0.0 for r in rewards], device=device)
    return [t.response for t in trajectories], [t.completion for t in trajectories], environment


def turn_bonus(trajectories: list[TrajectoryResult], loss_mask: Any) -> Any:
    """``[B, A]``: each turn's ``Step.reward`` at the turn's last sampled token (``turn_rewards: last``)."""
    import torch

    bonus = torch.zeros(loss_mask.shape, dtype=torch.float32, device=loss_mask.device)
    for row, t in enumerate(trajectories):
        for reward, end in zip(t.turn_rewards, t.turn_ends, strict=False):
            if reward is not None:
                bonus[row, end] += reward
    return bonus
