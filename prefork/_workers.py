"""The workers as the supervisor keeps them: one record per worker, and the one
census of them that scaling, ``stats()`` and the status of a pool all read.

No I/O: the census reads the records and, for self-feeding workers (MPM), the
busy/idle state each worker writes into its scoreboard slot (shared memory).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any, Final, NamedTuple, Protocol

from prefork import _scoreboard
from prefork._task import Task, WorkerInfo

BOOTING: Final = 0
READY: Final = 1
RETIRING: Final = 2  #: told to leave, or leaving on its own; not counted as alive


class Worker:
    """One worker: its slot, pid, channel, state, the tasks it holds (the ledger's deque)
    and what the loop needs to time its boot, stop and kill."""


    __slots__ = (
        "boot_error",
        "boot_killed",
        "budget",
        "cause",
        "channel",
        "eof",
        "idle_since",
        "inflight",
        "info",
        "kill_at",
        "lost",
        "lost_reason",
        "pid",
        "reason",
        "serial",
        "slot",
        "spawned_at",
        "stack_seen",
        "stack_wait",
        "state",
        "status",
        "stop_sent",
    )

    def __init__(self, slot: int, serial: int, now: float, budget: int) -> None:
        self.slot = slot
        self.serial = serial
        self.pid = 0
        self.channel: Any = None
        self.state = BOOTING
        self.inflight: deque[Task] = deque()
        self.budget = budget  # tasks it may still receive (-1: no limit)
        self.eof = False
        self.status: int | None = None
        self.boot_error = ""
        self.spawned_at = now
        self.idle_since = now
        self.kill_at = math.inf  # SIGKILL escalation time
        self.stop_sent = False
        self.boot_killed = False  # killed for taking longer than boot_timeout
        self.lost = False  # its fork server died: no exit status will come
        self.lost_reason = ""  # its channel broke: why
        self.stack_wait = 0.0  # a stack dump was asked for; give up waiting at this time
        self.stack_seen = 0
        self.reason = ""  # why it is leaving, when we know
        self.cause = ""  # the same, as one of prefork._status.EXIT_CAUSES
        self.info: WorkerInfo | None = None



class Census(NamedTuple):
    """How many workers are in each state (``retiring`` are not ``alive``)."""

    alive: int
    booting: int
    idle: int
    busy: int
    retiring: int
    longest_idle: float  #: seconds the longest-idle worker has been idle


class _Board(Protocol):
    def state(self, slot: int) -> int: ...

    def since(self, slot: int) -> float: ...


def census(workers: Iterable[Worker], now: float, board: _Board | None = None) -> Census:
    """Count ``workers`` by state.  A ready task worker is busy while it holds a task;
    with ``board`` (self-feeding workers) a ready worker is busy while its slot
    says so, and idle since the slot's last change."""
    alive = booting = idle = busy = retiring = 0
    longest_idle = 0.0
    for w in workers:
        state = w.state
        if state == RETIRING:
            retiring += 1
            continue
        alive += 1
        if state == BOOTING:
            booting += 1
        elif w.inflight or (board is not None and board.state(w.slot) == _scoreboard.BUSY):
            busy += 1
        else:
            idle += 1
            since = board.since(w.slot) if board is not None else w.idle_since
            longest_idle = max(longest_idle, now - since)
    return Census(alive, booting, idle, busy, retiring, longest_idle)


__all__ = ["BOOTING", "READY", "RETIRING", "Census", "Worker", "census"]
