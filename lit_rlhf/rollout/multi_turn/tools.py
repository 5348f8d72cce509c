"""Tools: plain Python functions the policy calls, their JSON schemas, and parsing the calls it writes.

A tool is a function (sync or async) with type hints and a Google-style docstring; its schema comes
from ``transformers.utils.get_json_schema`` and is rendered into the prompt by the tokenizer's own
chat template. The policy's calls are parsed from its sampled text by a :class:`ToolCallParser`
(``HermesToolParser``: Qwen/Hermes ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``).
Whatever goes wrong with a call (malformed, unknown tool, wrong arguments, the tool raising or
timing out) becomes the text of the tool message, which the policy reads, and is counted.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One call the policy wrote: the tool's ``name`` and its ``arguments``."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedCalls:
    """What a parser found in an assistant message: the well-formed calls and an error per malformed one."""

    calls: list[ToolCall]
    errors: list[str]

    @property
    def any(self) -> bool:
        return bool(self.calls or self.errors)


@dataclass(frozen=True)
class ToolResult:
    """A call's outcome: the tool message's ``content``, whether it is an error, and the seconds it took."""

    name: str
    content: str
    error: bool
    seconds: float


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a tool function (``transformers.utils.get_json_schema``).

    Raises:
        ValueError: naming the function and what its docstring or type hints lack.
    """
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # transformers raises its own types for a missing docstring or hint
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(
            f"tool {name}: {err}; a tool needs type hints on every argument and a Google-style docstring "
            "with an Args: section describing each one"
        ) from err


class ToolCallParser(ABC):
    """Finds the tool calls in an assistant message's text (a small replaceable component)."""

    @abstractmethod
    def parse(self, text: str) -> ParsedCalls:
        """The calls in ``text`` in order, and an error message for each call that cannot be read."""


class HermesToolParser(ToolCallParser):
    """Hermes/Qwen2.5 calls: ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``, any number of them.

    ``arguments`` may also be a JSON string of the object (as some models write it). An opening tag
    without its closing tag is a malformed call.
    """

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    PATTERN = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def parse(self, text: str) -> ParsedCalls:
        calls, errors = [], []
        for body in self.PATTERN.findall(text):
            call, error = self._read(body.strip())
            if call is not None:
                calls.append(call)
            else:
                errors.append(error)
        if text.count(self.OPEN) > text.count(self.CLOSE):
            errors.append(f"a tool call was opened with {self.OPEN} but not closed with {self.CLOSE}")
        return ParsedCalls(calls, errors)

    @staticmethod
    def _read(body: str) -> tuple[ToolCall | None, str]:
        try:
            data = json.loads(body)
        except json.JSONDecodeError as err:
            return None, f"the tool call is not valid JSON ({err.msg} at character {err.pos}): {body[:200]}"
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None, f'a tool call must be a JSON object with a "name" string and "arguments": {body[:200]}'
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None, f"the arguments of {data['name']} are not a JSON object: {arguments[:200]}"
        if not isinstance(arguments, dict):
            return None, f"the arguments of {data['name']} must be a JSON object, got {type(arguments).__name__}"
        return ToolCall(data["name"], arguments), ""


class Toolbox:
    """The tools of a run by name, with their schemas; runs calls concurrently and turns failures into text.

    Sync tools run on the toolbox's own threads (``threads`` of them, shared by every row of a
    rollout), so a rollout's calls wait together, not in turns of asyncio's default few workers.

    Args:
        tools: the tool functions (their ``__name__`` is the name the policy calls).
        timeout_s: a call that takes longer is an error (the policy reads that it timed out).
        max_parallel_calls: calls of one assistant turn that run at the same time.
        threads: the sync tools' threads.
    """

    def __init__(
        self, tools: Sequence[Callable], timeout_s: float = 30.0, max_parallel_calls: int = 8, threads: int = 64
    ) -> None:
        if max_parallel_calls < 1:
            raise ValueError(f"max_parallel_calls must be >= 1, got {max_parallel_calls}")
        self.tools: dict[str, Callable] = {}
        for fn in tools:
            name = getattr(fn, "__name__", None)
            if not callable(fn) or not name:
                raise ValueError(f"a tool must be a named function, got {fn!r}")
            if name in self.tools:
                raise ValueError(f"two tools are named {name!r}; tool names must be distinct")
            self.tools[name] = fn
        self.schemas = [tool_schema(fn) for fn in self.tools.values()]
        self.timeout_s, self.max_parallel_calls = timeout_s, max_parallel_calls
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None  # started on the first sync call

    async def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """The results of ``calls`` in their order; at most ``max_parallel_calls`` run at once."""
        limit = asyncio.Semaphore(self.max_parallel_calls)

        async def one(call: ToolCall) -> ToolResult:
            async with limit:
                return await self.call(call)

        return list(await asyncio.gather(*(one(call) for call in calls)))

    async def call(self, call: ToolCall) -> ToolResult:
        start = time.perf_counter()
        fn = self.tools.get(call.name)
        if fn is None:
            known = ", ".join(self.tools) or "none"
            return ToolResult(call.name, f"error: unknown tool {call.name!r} (tools: {known})", True, 0.0)
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as err:
            return ToolResult(call.name, f"error: wrong arguments for {call.name}: {err}", True, 0.0)
        try:
            if inspect.iscoroutinefunction(fn):
                value = await asyncio.wait_for(fn(**call.arguments), self.timeout_s)
            else:  # in a thread: a slow sync tool does not hold back the other rows' calls
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="lit_rlhf-tool")
                running = asyncio.get_running_loop().run_in_executor(
                    self._executor, functools.partial(fn, **call.arguments)
                )
                value = await asyncio.wait_for(running, self.timeout_s)
        except TimeoutError:
            seconds = time.perf_counter() - start
            return ToolResult(call.name, f"error: {call.name} timed out after {self.timeout_s:g} s", True, seconds)
        except Exception as err:  # the policy reads what went wrong; the run goes on
            seconds = time.perf_counter() - start
            return ToolResult(call.name, f"error: {call.name} raised {type(err).__name__}: {err}", True, seconds)
        content = value if isinstance(value, str) else json.dumps(value)
        return ToolResult(call.name, content, False, time.perf_counter() - start)
