"""Task functions for the benchmarks, importable by every pool's workers."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

PRELOADED: Any = None  # set by bench_memory.py before a pool forks: its workers inherit it


def noop() -> None:
    return None


def noop_arg(x: int) -> int:
    return x


def length(data: bytes) -> int:
    """The size of an argument: the payload case sends large ones."""
    return len(data)


def burn(loops: int) -> int:
    """Pure-Python CPU work: ``loops`` iterations of a small arithmetic loop."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1000003
    return acc


def burn_timed(loops: int) -> float:
    """``burn(loops)``; returns the CPU time it took in this worker (seconds)."""
    t = time.thread_time()
    burn(loops)
    return time.thread_time() - t


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


def hold(folder: str, seconds: float = 600.0) -> int:
    """Hold this worker: mark it started (a file named after its pid in ``folder``), then
    poll until ``folder/go`` exists, ``seconds`` at most.  bench_scale.py holds every
    worker of a pool with one, so that the tasks it submits next all stay queued."""
    open(os.path.join(folder, f"started-{os.getpid()}"), "w").close()
    end = time.monotonic() + seconds
    while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < end:
        time.sleep(0.01)
    return os.getpid()


def probe_preloaded(collect: bool) -> tuple[int, int]:
    """Read 100 items of ``PRELOADED``, then run a full collection if asked.

    Returns the worker's pid and how many objects its cyclic GC has frozen.  The short
    sleep spreads a batch of probes over every worker.
    """
    data = PRELOADED
    if data:
        step = max(1, len(data) // 100)
        for i in range(0, len(data), step):
            data[i]
    if collect:
        gc.collect()
    time.sleep(0.02)
    return os.getpid(), gc.get_freeze_count()
