"""What a timing was measured on: the CPU's kernel level, whether it has native bf16, its fp32 matmul rate.

Stage and benchmark times differ several-fold between machines of the same kind (AVX2 or
AVX512, more or less loaded); reporting them next to the machine's fp32 matmul rate lets a
reader compare figures measured on different machines.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from lit_rlhf.precision import native_bf16


def matmul_gflops(n: int = 2048, reps: int = 7) -> dict[str, float]:
    """fp32 ``n x n`` matmul rate now, in GFLOP/s: the median and the best of ``reps``."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(2):
        torch.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        times.append(time.perf_counter() - start)
    flop = 2 * n**3 / 1e9
    return {"median": round(flop / statistics.median(times), 1), "best": round(flop / min(times), 1)}


def describe_machine() -> dict:
    """The CPU's kernel level (``torch.backends.cpu.get_cpu_capability``), native bf16, fp32 matmul rate, threads."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cpu"),
        "fp32_matmul_gflops": matmul_gflops()["median"],
        "threads": torch.get_num_threads(),
    }


def stage_seconds(directory: str, stages: tuple[str, ...]) -> dict[str, float]:
    """The seconds each of ``stages`` took, from the ``<stage>_seconds.txt`` files the Makefile's timed
    stages write into ``directory`` (a stage without its file is left out)."""
    seconds = {}
    for stage in stages:
        path = os.path.join(directory, f"{stage}_seconds.txt")
        if os.path.exists(path):
            with open(path) as f:
                seconds[stage] = float(f.read())
    return seconds
