"""Task functions for the benchmarks, importable by every pool's workers."""

from __future__ import annotations

import time


def noop() -> None:
    return None


def noop_arg(x: int) -> int:
    return x


def burn(loops: int) -> int:
    """Pure-Python CPU work: ``loops`` iterations of a small arithmetic loop."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1000003
    return acc


def calibrate(seconds: float) -> int:
    """How many ``burn`` loops take ``seconds`` here (measured in this process)."""
    loops = 10_000
    while True:
        t = time.perf_counter()
        burn(loops)
        took = time.perf_counter() - t
        if took > 0.05:
            return max(1, int(loops * seconds / took))
        loops *= 2
