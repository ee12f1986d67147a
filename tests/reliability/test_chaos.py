"""Chaos: thousands of tasks while workers are SIGKILLed at random.

Afterwards every task has exactly one outcome, every task that succeeded wrote
exactly one "done" line to the append-only ledger, and the pool still works.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import pytest

import prefork


def ledger_task(ledger: str, n: int) -> int:
    time.sleep(0.002)  # long enough to be killed mid-run, short enough for thousands
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"done {n}\n".encode())
    finally:
        os.close(fd)
    return n


@pytest.mark.parametrize("mode", ["forkserver", "direct"])
def test_random_kills_lose_nothing_and_duplicate_nothing(tmp_path: Path, mode: str) -> None:
    ledger = str(tmp_path / "ledger")
    n_tasks = 3000
    stop = threading.Event()
    kills = 0
    with prefork.Executor(3, overrides={"pool.fork_from": mode}) as ex:
        rng = random.Random(4711)

        def killer() -> None:
            nonlocal kills
            while not stop.wait(0.03):
                pids = ex.pids()
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass

        chaos = threading.Thread(target=killer)
        chaos.start()
        try:
            futures = []
            for n in range(n_tasks):
                futures.append(ex.submit(ledger_task, ledger, n))
                if n % 100 == 0:
                    time.sleep(0.01)  # keep the storm going while tasks arrive
            _, pending = wait(futures, timeout=60)
        finally:
            stop.set()
            chaos.join(10)
        assert not pending, f"{len(pending)} tasks never got an outcome"
        outcomes = {"ok": 0, "lost": 0}
        succeeded = set()
        for n, fut in enumerate(futures):
            exc = fut.exception()
            if exc is None:
                assert fut.result() == n
                succeeded.add(n)
                outcomes["ok"] += 1
            else:
                assert isinstance(exc, prefork.WorkerLost), repr(exc)
                assert exc.started and exc.signal_name == "SIGKILL"
                outcomes["lost"] += 1
        # the pool is healthy afterwards
        assert sorted(ex.submit(abs, -i).result(timeout=10) for i in range(10)) == list(range(10))
    assert kills >= 20, f"only {kills} kills: the chaos was too gentle"
    assert outcomes["ok"] + outcomes["lost"] == n_tasks
    lines = Path(ledger).read_text().splitlines()
    counts: dict[int, int] = {}
    for line in lines:
        counts[int(line.split()[1])] = counts.get(int(line.split()[1]), 0) + 1
    assert all(counts.get(n) == 1 for n in succeeded), "a succeeded task wrote no or several done lines"
    assert all(c == 1 for c in counts.values()), "a task ran twice"
    assert outcomes["lost"] <= kills
