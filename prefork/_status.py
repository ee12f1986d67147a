"""What a running pool tells about itself: running totals (:class:`Tally`, kept by
the supervisor's loop) and the status snapshot that ``prefork status``, the
control socket, the metrics and the status page all read (:func:`snapshot`).

The snapshot is built from any thread: it copies what it reads (the worker
records, the scoreboard's words, the tasks in flight) without locks, so a
number may be one event old, never torn.  It is plain JSON data; its layout
is versioned by ``STATUS_VERSION``.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import Counter
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Final

import attrs

from prefork import _scoreboard
from prefork._task import Task
from prefork._workers import BOOTING, RETIRING
from prefork.errors import PoolBroken, PoolShutDown, TaskTimeout, WorkerLost

if TYPE_CHECKING:
    from prefork._supervisor import Supervisor

STATUS_VERSION: Final = 1

#: how a task can fail, as counted
FAILURE_KINDS: Final = ("error", "crash", "timeout", "cancelled", "shutdown")
#: why a worker left, as counted (``Worker.cause``)
EXIT_CAUSES: Final = (
    "crash", "boot-failure", "timeout", "cancelled", "broken-channel", "max-tasks", "max-age", "max-rss",
    "recycled", "scaled-down", "reload", "shutdown",
)

_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def failure_kind(value: BaseException) -> str:
    """The kind a failed task is counted under."""
    if isinstance(value, TaskTimeout):
        return "timeout"
    if isinstance(value, WorkerLost):
        return "crash"
    if isinstance(value, CancelledError):
        return "cancelled"
    if isinstance(value, PoolShutDown | PoolBroken):
        return "shutdown"
    return "error"


#: upper bounds (s) of the time histograms' buckets (the last one, +inf, implied)
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Counts of observations per bucket of ``BUCKETS`` (not cumulative; the last is +inf) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(BUCKETS), "counts": list(self.counts), "sum": self.sum, "count": sum(self.counts)}


class Tally:
    """Running totals of one pool, kept by its loop (one thread writes).

    With ``timing`` (metrics asked for it) each outcome also goes into two
    histograms: time in the queue (submitted to started) and run time."""

    __slots__ = ("completed", "exits", "failed", "queue_wait", "run_time", "started_at", "started_wall", "timing")

    def __init__(self, timing: bool = False) -> None:
        self.completed = 0  #: tasks that returned a value
        self.failed: Counter[str] = Counter()  #: by ``failure_kind``
        self.exits: Counter[str] = Counter()  #: workers that left, by cause
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.timing = timing
        self.queue_wait = Histogram()
        self.run_time = Histogram()

    def outcome(self, task: Task, ok: bool, value: Any) -> None:
        if ok:
            self.completed += 1
        else:
            self.failed[failure_kind(value) if isinstance(value, BaseException) else "error"] += 1
        if self.timing and task.started_at:
            if task.submitted_at:
                self.queue_wait.observe(max(0.0, task.started_at - task.submitted_at))
            if task.finished_at:
                self.run_time.observe(max(0.0, task.finished_at - task.started_at))


def method_name(method: Any) -> str:
    """``module:qualname`` of a callable, or the name a task asked for."""
    if isinstance(method, str):
        return method
    func = getattr(method, "func", None)  # functools.partial
    target = func if func is not None and callable(func) else method
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{name}"


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (``None`` if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _policy(policy: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": getattr(policy, "name", type(policy).__qualname__)}
    if attrs.has(type(policy)):
        for field in attrs.fields(type(policy)):
            value = getattr(policy, field.name)
            if isinstance(value, bool | int | float | str):
                out[field.name] = value
    out["max_workers"] = policy.max_workers()
    return out


def _worker_entries(sup: Supervisor, now: float) -> list[dict[str, Any]]:
    words = sup.scoreboard.words
    in_flight = sup.ledger.in_flight
    entries = []
    for w in sorted(sup.workers, key=lambda w: w.slot):
        base = w.slot * _scoreboard.WORDS
        slot_state = words[base + _scoreboard.STATE]
        if w.state == RETIRING or slot_state == _scoreboard.EXITING:
            state = "stopping"
        elif w.state == BOOTING or slot_state in (_scoreboard.BOOTING, _scoreboard.FREE):
            state = "booting"
        elif slot_state == _scoreboard.BUSY:
            state = "busy"
        elif slot_state == _scoreboard.KEEPALIVE:  # between two requests of a kept-alive connection (MPM)
            state = "keepalive"
        else:
            state = "idle"
        entry: dict[str, Any] = {
            "slot": w.slot,
            "pid": w.pid or None,
            "state": state,
            "served": int(words[base + _scoreboard.DONE]) if w.pid else 0,
            "age": round(now - w.spawned_at, 3),
            "rss": rss_bytes(w.pid) if w.pid else None,
            "task": None,
            "method": None,
            "running_for": None,
        }
        if slot_state == _scoreboard.BUSY:
            tid = int(words[base + _scoreboard.TASK])
            # a self-feeding worker's busy() writes no task start: its request began at its busy()
            began = words[base + (_scoreboard.SINCE if sup.self_feeding else _scoreboard.STARTED)]
            entry["running_for"] = round(max(0.0, now - began / 1e9), 3)
            task = in_flight.get(tid)
            if task is not None:
                entry["task"] = tid
                entry["method"] = method_name(task.method)
            elif sup.body is not None:  # a self-feeding worker (MPM) runs its body
                entry["method"] = method_name(sup.body)
        if w.state == RETIRING and w.reason:
            entry["leaving"] = w.reason
        entries.append(entry)
    return entries


def snapshot(sup: Supervisor) -> dict[str, Any]:
    """The pool's status as JSON data (see the module text)."""
    now = time.monotonic()
    try:
        workers = [] if sup.stopped else _worker_entries(sup, now)
    except ValueError:  # the pool stopped meanwhile: its scoreboard is gone
        workers = []
    tally = sup.tally
    by_state = Counter(e["state"] for e in workers)
    if sup.broken is not None:
        state = "broken"
    elif sup.stopped:
        state = "stopped"
    else:
        state = "stopping" if sup.closing else "running"
    return {
        "version": STATUS_VERSION,
        "name": sup.config.name,
        "profile": sup.config.profile,
        "pid": os.getpid(),
        "uptime": round(now - tally.started_at, 3),
        "started": tally.started_wall,
        "state": state,
        "policy": _policy(sup.policy),
        "workers": workers,
        "totals": {
            "workers": by_state["booting"] + by_state["idle"] + by_state["busy"] + by_state["keepalive"],
            "booting": by_state["booting"],
            "idle": by_state["idle"],
            "busy": by_state["busy"],
            "keepalive": by_state["keepalive"],
            "stopping": by_state["stopping"],
            "queued": len(sup.ledger.queue),
            "in_flight": len(sup.ledger.in_flight),
            "submitted": sup.submitted,
            "completed": tally.completed,
            "failed": {kind: tally.failed[kind] for kind in FAILURE_KINDS},
            "exits": dict(sorted(tally.exits.items())),
            "spawned": sup.spawned_total,
            "taken_back": sup.ledger.taken_back,
        },
        **({"timing": {"queue_wait": tally.queue_wait.as_dict(), "run_time": tally.run_time.as_dict()}} if tally.timing else {}),
    }


__all__ = ["BUCKETS", "EXIT_CAUSES", "FAILURE_KINDS", "STATUS_VERSION", "Histogram", "Tally", "failure_kind", "method_name", "snapshot"]
