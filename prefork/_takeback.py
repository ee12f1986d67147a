"""Taking back a task a worker holds but has not started.

When tasks are long (``prefork._dispatch.LONG_TASK``) and the queue is deep, a
worker holds two: the one it runs and the next, so that no round trip to the
supervisor sits between them.  The next is sent in a TAKEABLE frame.  If
another worker runs out of work while the first is still busy, the supervisor
takes the waiting task back and gives it to the free worker, so a slow task
holds nothing hostage.

The claim on such a task is settled under a POSIX record lock (``fcntl.lockf``)
on the slot's byte of one shared memory file (``Scoreboard.claims``):

    worker, before a takeable task          supervisor, taking back task T
    ──────────────────────────────          ───────────────────────────────
    lock(slot)                              lock(slot), never waiting (busy: later)
    TAKEN == T ? TAKEN = 0, skip T          TASK != T and TAKEN == 0 ?
    else STARTED, TASK = T: it runs            TAKEN = T: T is the supervisor's again
    unlock                                  unlock

Either the worker starts T or the supervisor takes it, never both: nothing
runs twice.  One take-back at a time per slot (TAKEN is one word, cleared by
the worker as it passes the task).  Record locks belong to a process, are not
inherited by a fork and go when their process dies: a worker killed inside
the lock wedges no one.  Tasks in CALLS frames (short and medium ones) take no
lock: their path has no system call.
"""

from __future__ import annotations

import fcntl
from typing import Final

from prefork import _scoreboard
from prefork._ledger import Ledger
from prefork._workers import Worker

#: take-back claims this process made as a worker (read by the tests: none for short tasks)
claims = 0


class Claim:
    """In a worker: the claim on each task of a TAKEABLE frame before it starts."""

    __slots__ = ("_base", "_fd", "_slot", "_words")

    def __init__(self, board: _scoreboard.Scoreboard, slot: int) -> None:
        self._fd = board.claims
        self._words = board.words
        self._base = slot * _scoreboard.WORDS
        self._slot = slot

    def __call__(self, tid: int, now_ns: int) -> bool:
        """True: ``tid`` is this worker's to run (its start is written, under the lock).
        False: the supervisor took it back; skip it, and send nothing for it."""
        global claims
        claims += 1
        words, base = self._words, self._base
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._slot)
        try:
            if words[base + _scoreboard.TAKEN] == tid:
                words[base + _scoreboard.TAKEN] = 0  # passed: the slot may lose another task
                return False
            words[base + _scoreboard.STARTED] = now_ns  # before TASK: a timer never sees a stale start
            words[base + _scoreboard.TASK] = tid
            return True
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._slot)


#: the answer of :func:`take` when the slot's lock is held (its worker is claiming): look later
BUSY: Final = None


def take(board: _scoreboard.Scoreboard, slot: int, tid: int) -> bool | None:
    """In the supervisor: take task ``tid`` back from the worker of ``slot``, never
    waiting.  True: taken, the worker will skip it.  False: it started, or the
    worker has not yet passed the last task taken from it.  ``BUSY``: try later."""
    fd = board.claims
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: its worker holds it
        return BUSY
    try:
        words = board.words
        base = slot * _scoreboard.WORDS
        if words[base + _scoreboard.TASK] == tid or words[base + _scoreboard.TAKEN] != 0:
            return False
        words[base + _scoreboard.TAKEN] = tid
        return True
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, slot)


def take_back(ledger: Ledger, board: _scoreboard.Scoreboard, free: int, holders: list[Worker]) -> tuple[int, bool]:
    """Give ``free`` idle workers something to do: take back, from the ``holders``
    (workers with a channel, leaving or not), the last task each holds when it was sent takeable and has not
    started, the longest-running holders first.  Each task taken goes to the front
    of the queue and gives its worker's budget (``max_tasks_per_child``) back.
    Returns how many were taken, and whether a slot's lock was held (``BUSY``: its
    worker was claiming), so that the caller looks again soon."""
    words = board.words
    started = _scoreboard.STARTED
    width = _scoreboard.WORDS
    takeable = ledger.takeable
    candidates = []
    for w in holders:
        held = w.inflight
        if len(held) >= 2 and held[-1].id in takeable:
            candidates.append((words[w.slot * width + started], w))
    candidates.sort(key=lambda c: c[0])
    taken = 0
    busy = False
    for _, w in candidates:
        if taken >= free:
            break
        task = w.inflight[-1]
        answer = take(board, w.slot, task.id)
        if answer:
            ledger.take_back(w, task)
            if w.budget > 0:
                w.budget += 1  # it will not run this one: its budget counts tasks it runs
            taken += 1
        elif answer is BUSY:
            busy = True
    return taken, busy and taken < free


__all__ = ["BUSY", "Claim", "take", "take_back"]
