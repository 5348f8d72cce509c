"""Running reward components under a total deadline per call.

A sync ``score`` runs on a daemon helper thread that the trainer waits for at most ``timeout_s``:
Python cannot stop a thread, so a hung one is abandoned (a daemon thread never keeps the process
alive) and the run ends with a :class:`RewardError`. Async components run together on one event
loop in a daemon thread, each under ``asyncio.wait_for(timeout_s)``; the loop itself is waited for
at most the longest deadline plus a grace, which also bounds an ``async def`` that blocks its loop
(e.g. ``time.sleep`` or a blocking HTTP call inside it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import torch

# extra seconds the loop thread gets over the longest deadline before it is taken for blocked
LOOP_GRACE_S = 2.0


class DeadlinePassed(Exception):
    """A call was still running at its deadline (an awaitable is cancelled, a thread abandoned)."""


class LoopBlocked(DeadlinePassed):
    """The event loop of the async components stayed blocked past the longest deadline."""


def timeout_message(name: str, timeout_s: float, detail: str = "") -> str:
    """The error of a component past its deadline: names it and the setting to raise."""
    return (
        f"reward {name} gave no scores within its timeout_s={timeout_s:g} s{detail}; if it is only slow, raise "
        f"timeout_s in the component's init_args (e.g. timeout_s: {max(2 * timeout_s, 1):g}), else fix what it waits on"
    )


def run_in_thread(fn: Callable[[], Any], timeout_s: float, name: str) -> Any:
    """``fn()`` on a daemon thread, waited for at most ``timeout_s`` seconds.

    The thread keeps the caller's grad mode (thread-local in torch).

    Raises:
        DeadlinePassed: ``fn`` did not return in time (it is left running; the process can still exit).
        BaseException: whatever ``fn`` raised.
    """
    box: dict[str, Any] = {}
    grad = torch.is_grad_enabled()

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name=f"reward {name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise DeadlinePassed(timeout_s)
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _bounded(awaitable: Awaitable, timeout_s: float) -> Any:
    # asyncio.wait, not wait_for: a TimeoutError the reward raises itself stays its own error
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait({task}, timeout=timeout_s)
    if not task.done():
        task.cancel()
        raise DeadlinePassed(timeout_s)
    return task.result()


def await_with_deadlines(awaitables: dict[str, Awaitable], timeouts: dict[str, float]) -> dict[str, Any]:
    """Await ``awaitables`` (by component name) together, each within its ``timeouts[name]`` seconds.

    Returns each one's result, or the exception it raised (:class:`DeadlinePassed` past its deadline).
    The loop runs on a daemon thread, so this works inside a running event loop (a notebook) too.

    When the loop stays blocked past the longest deadline (an ``async def`` that makes a blocking
    call), the components not finished by then get :class:`LoopBlocked` and the others nothing.
    """
    names = list(awaitables)
    done: set[str] = set()
    late: set[str] = set()

    async def gather() -> list:
        async def one(name: str) -> Any:
            try:
                return await _bounded(awaitables[name], timeouts[name])
            except DeadlinePassed:
                late.add(name)  # cancelled; a task that ignores the cancel keeps the loop from ending
                raise
            finally:
                done.add(name)

        return await asyncio.gather(*(one(n) for n in names), return_exceptions=True)

    longest = max(timeouts[n] for n in names)
    try:
        outcomes = run_in_thread(lambda: asyncio.run(gather()), longest + LOOP_GRACE_S, "event loop")
    except DeadlinePassed:
        blocked = [n for n in names if n not in done] or sorted(late) or names
        return {name: LoopBlocked(timeouts[name]) for name in blocked}
    return dict(zip(names, outcomes, strict=True))
