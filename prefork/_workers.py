"""The workers as the supervisor keeps them: one record per worker, the table
that finds them by slot, pid and channel, the one census of them that scaling,
``stats()`` and the status of a pool all read, and what a worker's timers and
its exit mean.

No I/O: the census reads the records and, for self-feeding workers (MPM), the
busy/keepalive/idle state each worker writes into its scoreboard slot (shared memory).
The supervisor signals, reads and closes; this module says what and whom.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
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


#: slot states a ready self-feeding worker counts as busy in: a kept-alive connection holds it
#: too (it accepts no other), so it is no spare, as Apache's "K" counts for its spare servers
_BUSY: Final = frozenset((_scoreboard.BUSY, _scoreboard.KEEPALIVE))


def census(workers: Iterable[Worker], now: float, board: _Board | None = None) -> Census:
    """Count ``workers`` by state.  A ready task worker is busy while it holds a task;
    with ``board`` (self-feeding workers) a ready worker is busy while its slot
    says busy or keepalive, and idle since the slot's last change."""
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
        elif w.inflight or (board is not None and board.state(w.slot) in _BUSY):
            busy += 1
        else:
            idle += 1
            since = board.since(w.slot) if board is not None else w.idle_since
            longest_idle = max(longest_idle, now - since)
    return Census(alive, booting, idle, busy, retiring, longest_idle)


class WorkerTable:
    """The pool's workers by slot, by pid and by channel descriptor, and the free slots.

    A slot (a scoreboard row) is taken by :meth:`add` and given back by
    :meth:`remove`, once; the slot freed last is taken first."""

    __slots__ = ("_by_fd", "_by_pid", "_free", "by_slot", "slots")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.by_slot: dict[int, Worker] = {}
        self._by_pid: dict[int, Worker] = {}
        self._by_fd: dict[int, Worker] = {}
        self._free = list(range(slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.by_slot)

    def __bool__(self) -> bool:
        return bool(self.by_slot)

    def all(self) -> list[Worker]:
        """The workers now (a copy: the table may change while the caller iterates)."""
        return list(self.by_slot.values())

    def add(self, serial: int, now: float, budget: int) -> Worker | None:
        """A record for a worker about to be forked, in a free slot (``None``: no slot free)."""
        if not self._free:
            return None
        w = Worker(self._free.pop(), serial, now, budget)
        self.by_slot[w.slot] = w
        return w

    def current(self, slot: int, serial: int) -> Worker | None:
        """The worker a spawner's event is about, unless the table gave up on it (removed)."""
        w = self.by_slot.get(slot)
        return w if w is not None and w.serial == serial else None

    def holds(self, w: Worker) -> bool:
        return self.by_slot.get(w.slot) is w

    def forked(self, w: Worker, pid: int) -> None:
        w.pid = pid
        self._by_pid[pid] = w

    def watch(self, w: Worker, fd: int) -> None:
        """``w``'s channel is ``fd``."""
        self._by_fd[fd] = w

    def unwatch(self, fd: int) -> None:
        self._by_fd.pop(fd, None)

    def by_pid(self, pid: int) -> Worker | None:
        return self._by_pid.get(pid)

    def by_fd(self, fd: int) -> Worker | None:
        return self._by_fd.get(fd)

    def remove(self, w: Worker, fd: int = -1) -> bool:
        """Forget ``w`` (and its channel ``fd``) and free its slot; False if it was gone already."""
        if self.by_slot.get(w.slot) is not w:
            return False
        del self.by_slot[w.slot]
        if w.pid and self._by_pid.get(w.pid) is w:
            del self._by_pid[w.pid]
        if fd >= 0 and self._by_fd.get(fd) is w:
            del self._by_fd[fd]
        self._free.append(w.slot)
        return True

    def ready(self) -> list[Worker]:
        """Workers that may be given tasks now: booted, not leaving, with budget, channel open."""
        return [w for w in self.by_slot.values() if w.state == READY and w.budget != 0 and not w.eof]

    def has_room(self) -> bool:
        """Is a ready worker holding nothing?"""
        return any(w.state == READY and not w.inflight and w.budget != 0 for w in self.by_slot.values())

    def alive(self) -> int:
        """Workers not leaving (``census().alive``, cheaper)."""
        return sum(1 for w in self.by_slot.values() if w.state != RETIRING)

    def census(self, now: float, board: _Board | None = None) -> Census:
        return census(self.by_slot.values(), now, board)

    def pids(self) -> list[int]:
        """Pids of the workers alive now."""
        return [w.pid for w in list(self.by_slot.values()) if w.pid and w.status is None]

    def next_deadline(self, boot_timeout: float) -> float:
        """The soonest kill or boot deadline of any worker (``inf``: none)."""
        soonest = math.inf
        for w in self.by_slot.values():
            if w.kill_at < soonest:
                soonest = w.kill_at
            if w.state == BOOTING and not w.boot_killed:
                soonest = min(soonest, w.spawned_at + boot_timeout)
        return soonest

    def due(self, now: float, boot_timeout: float, max_age: float) -> Iterator[tuple[Worker, str]]:
        """Workers whose timer has come, with what is due: ``"old"`` (past ``max_age``,
        ready: recycle it), ``"kill"`` (its SIGKILL escalation), ``"boot"`` (it did not
        boot within ``boot_timeout``)."""
        for w in self.all():
            if max_age and w.state == READY and now - w.spawned_at > max_age:
                yield w, "old"
            if w.kill_at <= now and w.pid:
                yield w, "kill"
            if w.state == BOOTING and now - w.spawned_at > boot_timeout and not w.boot_killed:
                yield w, "boot"


class Verdict(NamedTuple):
    """What a worker's exit means for the pool."""

    expected: bool  #: it was asked to leave (or the pool is closing)
    boot_failure: str  #: why its boot failed ("" if it booted, or was asked to leave)
    cause: str  #: one of ``prefork._status.EXIT_CAUSES``


def verdict(w: Worker, closing: bool, failed_initializer: bool, status_text: str) -> Verdict:
    """Judge ``w``'s exit: ``failed_initializer`` when its exit code says the
    initializer raised; ``status_text`` describes its wait status."""
    expected = w.state == RETIRING or closing
    booted = w.state != BOOTING and not w.boot_error
    if not booted and not expected:
        why = w.boot_error or f"the worker exited during boot ({status_text})"
        if failed_initializer and not w.boot_error:
            why = "the worker's initializer failed"
        return Verdict(False, why, "boot-failure")
    if not expected:
        return Verdict(False, "", "crash")
    return Verdict(True, "", w.cause or "shutdown")


__all__ = ["BOOTING", "READY", "RETIRING", "Census", "Verdict", "Worker", "WorkerTable", "census", "verdict"]
