"""W3's measurements: the per-iteration timer (phases, tool waits, what the turn loop did, other
processes' CPU use) and the check that the work is W3's own (prompts and tool suffixes token for token).
Used by ``benchmarks/w3.py``."""

from __future__ import annotations

import os
import statistics
import time

import lightning as L

from lit_rlhf.rollout.multi_turn.environment import MALFORMED_CALL


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used, CPU seconds this process has used) since boot (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (user + nice + system + irq + softirq + steal) / tick, (int(fields[11]) + int(fields[12])) / tick


def interval_union(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) spans."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class W3Timer(L.Callback):
    """Wall time of each epoch (= one W3 iteration), its phases, and what the turn loop did.

    Phases: ``1_generation`` (the engine's generate calls, every turn), ``1_tool_wait`` (wall time with
    at least one tool call running), ``1_turn_loop_other`` (the rest of the rollout's sampling:
    parsing, chat-template rendering of observations, the template check), ``2_scoring`` (reference
    forward, rewards), ``2_reward_fn`` (inside it, the reward function), ``3_advantages``,
    ``4_training`` (forward, backward and optimizer steps of the 4 mini-batches, and Lightning's loop).
    """

    def __init__(self, tools_module) -> None:
        self.tools = tools_module
        self.seconds: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.iters: list[dict] = []
        self.foreign: list[float] = []  # CPU cores other processes used during each iteration (mean)
        self.reward_s = 0.0

    def on_train_start(self, trainer, module) -> None:
        engine, loop = module.rollout.engine, module.runner.turn_loop
        generate, run_tools, run_turns = engine.generate, loop.toolbox.run, loop.run

        def timed_generate(requests, generation, on_token=None):
            start = time.perf_counter()
            samples = generate(requests, generation, on_token)
            seconds = time.perf_counter() - start
            self.cur["generate_s"] += seconds
            self.cur["generate_calls"].append(
                {
                    "rows": len(requests),
                    "context_width": max(len(r.prompt_ids) for r in requests),
                    "new_tokens_max": max(len(s.token_ids) for s in samples),
                    "new_tokens_sum": sum(len(s.token_ids) for s in samples),
                    "seconds": round(seconds, 4),
                }
            )
            return samples

        async def timed_tools(calls):
            start = time.perf_counter()
            try:
                return await run_tools(calls)
            finally:
                self.cur["tool_spans"].append((start, time.perf_counter()))

        def timed_turns(*a, **k):
            results = run_turns(*a, **k)
            self.cur["trajectories"] = results
            return results

        engine.generate, loop.toolbox.run, loop.run = timed_generate, timed_tools, timed_turns

    def on_train_epoch_start(self, trainer, module) -> None:
        self.cur = {"generate_s": 0.0, "generate_calls": [], "tool_spans": [], "trajectories": None}
        self.tool_s0, self.calls0 = self.tools.STATS["seconds"], self.tools.STATS["calls"]
        self.fails0, self.reward_s = self.tools.STATS["failures"], 0.0
        self.cpu0 = cpu_seconds()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        total = time.perf_counter() - self.start
        (all1, own1), (all0, own0) = cpu_seconds(), self.cpu0
        self.foreign.append(max(0.0, (all1 - all0) - (own1 - own0)) / total)  # other processes' cores, on average
        timing = next(c for c in trainer.callbacks if hasattr(c, "last_timing")).last_timing
        cur = self.cur
        tool_wait = interval_union(cur["tool_spans"])
        self.seconds.append(total)
        self.phases.append(
            {
                "1_generation": cur["generate_s"],
                "1_tool_wait": tool_wait,
                "1_turn_loop_other": timing["generation_s"] - cur["generate_s"] - tool_wait,
                "2_scoring": timing["scoring_s"],
                "2_reward_fn": self.reward_s,
                "3_advantages": timing["advantages_s"],
                "4_training": total - timing["generation_s"] - timing["scoring_s"] - timing["advantages_s"],
            }
        )
        trajectories = cur["trajectories"]
        # calls as TRL counts them: parsed calls (a <tool_call> whose JSON could not be read is no call for
        # TRL, and lit_rlhf's "<malformed>" error for it is counted separately)
        calls = [sum(n for k, n in t.tool_calls.items() if k != MALFORMED_CALL) for t in trajectories]
        errors = [sum(n for k, n in t.tool_errors.items() if k != MALFORMED_CALL) for t in trajectories]
        lengths = [len(t.trajectory.response_ids) for t in trajectories]
        model_tokens = [sum(t.trajectory.loss_mask) for t in trajectories]
        self.iters.append(
            {
                "rows": [
                    (len(t.trajectory.prompt_ids), n, m)
                    for t, n, m in zip(trajectories, lengths, model_tokens, strict=True)
                ],
                "tool_calls": sum(calls),
                "tool_errors": sum(errors),
                "malformed_calls": sum(t.tool_calls.get(MALFORMED_CALL, 0) for t in trajectories),
                "after_malformed_turns": sum(
                    t.trajectory.turns > 1 and MALFORMED_CALL in t.tool_calls and not calls[j]
                    for j, t in enumerate(trajectories)
                ),
                "calculator_invocations": self.tools.STATS["calls"] - self.calls0,
                "calculator_failures": self.tools.STATS["failures"] - self.fails0,
                "tool_exec_s_sum": round(self.tools.STATS["seconds"] - self.tool_s0, 4),
                "tool_wait_s": round(tool_wait, 4),
                "turns_mean": statistics.mean(len(t.completion) for t in trajectories),
                "assistant_turns_hist": {
                    str(k): sum(t.trajectory.turns == k for t in trajectories) for k in range(1, 4)
                },
                "completion_len_mean": statistics.mean(lengths),
                "completion_len_max": max(lengths),
                "model_tokens": sum(model_tokens),
                "completion_tokens": sum(lengths),
                "truncated": sum(t.truncated for t in trajectories),
                "template_mismatches": sum(t.template_mismatch is not None for t in trajectories),
                "exact_answer_rate": float(module.buffer.experience.scores.gt(0).float().mean()),
                "generate_calls": cur["generate_calls"],
            }
        )
        if len(self.seconds) == 1:
            self.first = trajectories


def check_workload(trajectories, tok, w3_common) -> dict:
    """The first iteration's prompts are W3's rendered prompts (with the tool schema) token for token,
    and each successful call's tool suffix is the one TRL appends (``w3_common.tool_suffix_ids``)."""
    prompts_equal = all(
        t.trajectory.prompt_ids == w3_common.prompt_ids(tok, t.trajectory.messages[0]["content"]) for t in trajectories
    )
    suffixes = checked = 0
    for t in trajectories:
        traj = t.trajectory
        msgs = traj.messages[traj.prompt_messages :]
        if len(msgs) < 2 or msgs[1]["role"] != "tool" or msgs[1]["content"].startswith("error"):
            continue
        first_turn = traj.loss_mask.index(0) if 0 in traj.loss_mask else len(traj.loss_mask)
        want = w3_common.tool_suffix_ids(tok, msgs[1]["content"])
        got = traj.response_ids[first_turn : first_turn + len(want)]
        checked += 1
        suffixes += got == want and traj.loss_mask[first_turn : first_turn + len(want)] == [0] * len(want)
    return {
        "prompts_equal_w3_prompt_ids": prompts_equal,
        "tool_suffixes_checked": checked,
        "tool_suffixes_equal": suffixes,
    }
