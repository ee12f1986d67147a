"""The task ledger: where every task is, and what each event means for it.  No I/O.

A task is queued, then held by one worker (dispatched to it, in the order the
worker runs them), then settled: answered by its worker, timed out, cancelled,
or caught in its worker's death.  The supervisor does the I/O (frames, signals,
the sink's ``deliver``) and asks the ledger what an event means:

- :meth:`Ledger.take` hands out the next queued task to dispatch; the caller
  claims it with the sink the first time (``task.claimed``), never again.
- :meth:`Ledger.held_task` says whether a result belongs to a task that worker
  holds (a stray or late result belongs to nobody).
- :meth:`Ledger.settle_death` says, for each task a dead worker held, whether
  it fails (it had started: ``WorkerLost``; or it was sent back too often) or
  goes back to the front of the queue (it never reached user code).
- :meth:`Ledger.take_back` moves a task a worker holds but has not started
  back to the front of the queue (``prefork._takeback`` settles the claim with
  the worker first); ``takeable`` names the held tasks that were sent so.

Counters are separate: ``claimed`` (the sink said yes once), ``retries``
(re-dispatches after a death before the start), ``crashes`` (deaths while it
ran).  A task leaves the ledger exactly once, through :meth:`release` or one of
the settle methods: that is what makes "one outcome per task" checkable
(``tests/test_ledger.py`` drives random event sequences against it).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Final, NamedTuple

from prefork._task import Task

MAX_REDISPATCH: Final = 3  #: a task whose worker died before it started goes back this often


class Lost(NamedTuple):
    """A task a dead worker held that fails: whether it had started, and why."""

    task: Task
    started: bool
    detail: str


class Settlement(NamedTuple):
    """What a worker's death means: tasks that fail, and tasks sent back (already requeued)."""

    lost: list[Lost]
    requeued: list[Task]


class Ledger:
    """Queue, tasks in flight by id and by holder, and their deadlines.

    ``holder`` is any hashable key for a worker (the supervisor uses the worker
    record).  Tasks a holder has are kept in the order they were given to it,
    which is the order it runs them.
    """

    __slots__ = ("_held", "deadlines", "in_flight", "max_crash_retries", "max_redispatch", "queue", "takeable", "taken_back")

    def __init__(self, max_crash_retries: int = 0, max_redispatch: int = MAX_REDISPATCH) -> None:
        self.queue: deque[Task] = deque()
        self.in_flight: dict[int, Task] = {}
        self._held: dict[Hashable, deque[Task]] = {}
        self.deadlines: list[tuple[float, int]] = []  #: (when, task id), a heap
        self.max_crash_retries = max_crash_retries
        self.max_redispatch = max_redispatch
        #: ids of tasks in flight that were sent takeable (only those may be taken back)
        self.takeable: set[int] = set()
        self.taken_back = 0  #: tasks taken back so far

    # -- the queue ------------------------------------------------------------------

    def take(self) -> Task | None:
        """The next queued task not yet answered (cancelled while queued), or ``None``."""
        queue = self.queue
        while queue:
            task = queue.popleft()
            if not task.done:
                return task
        return None

    def drain_queue(self) -> list[Task]:
        """Every queued task, out of the queue (to be cancelled or failed)."""
        tasks = list(self.queue)
        self.queue.clear()
        return tasks

    # -- in flight --------------------------------------------------------------------

    def held(self, holder: Hashable) -> deque[Task]:
        """The tasks ``holder`` has, in the order it runs them (a live view)."""
        got = self._held.get(holder)
        if got is None:
            got = self._held[holder] = deque()
        return got

    def give(self, holder: Hashable, task: Task, now: float) -> None:
        """``task`` goes to ``holder``; its deadline (if any) counts from ``now`` until it starts."""
        held = self._held.get(holder)
        if held is None:
            held = self._held[holder] = deque()
        held.append(task)
        self.in_flight[task.id] = task
        task.holder = holder
        if task.timeout:
            heapq.heappush(self.deadlines, (now + task.timeout, task.id))

    def held_task(self, holder: Hashable, tid: int) -> Task | None:
        """The task ``tid`` if ``holder`` has it (a result of it is its outcome), else ``None``."""
        task = self.in_flight.get(tid)
        if task is None or task.holder is not holder:
            return None
        return task

    def release(self, task: Task) -> None:
        """``task`` has its outcome: it leaves its holder and the ledger."""
        del self.in_flight[task.id]
        held = self._held[task.holder]
        if held[0] is task:
            held.popleft()
        else:
            held.remove(task)
        task.holder = None
        if self.takeable:
            self.takeable.discard(task.id)

    def take_back(self, holder: Hashable, task: Task) -> None:
        """``holder`` will not start ``task`` (it was taken back under the slot's lock):
        the task goes to the front of the queue, as it is (claimed, its counters kept).
        Its deadline entry stays: the next holder's start is what counts."""
        held = self._held[holder]
        if held[-1] is task:
            held.pop()
        else:
            held.remove(task)
        del self.in_flight[task.id]
        self.takeable.discard(task.id)
        task.holder = None
        self.queue.appendleft(task)
        self.taken_back += 1

    def holder_of(self, task: Task) -> Hashable | None:
        return task.holder if task.id in self.in_flight else None

    def due(self, now: float) -> Iterator[Task]:
        """Tasks in flight whose deadline has come (their deadline entries are consumed)."""
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            _, tid = heapq.heappop(deadlines)
            task = self.in_flight.get(tid)
            if task is not None:
                yield task

    def defer(self, task: Task, when: float) -> None:
        """Look at ``task``'s deadline again at ``when`` (it had not started, or started late)."""
        heapq.heappush(self.deadlines, (when, task.id))

    def next_deadline(self) -> float | None:
        return self.deadlines[0][0] if self.deadlines else None

    # -- deaths -----------------------------------------------------------------------

    def settle_death(self, holder: Hashable, last_started: int, force: bool = False) -> Settlement:
        """``holder`` died; ``last_started`` is the id of the last task it started (its
        scoreboard says so).  Tasks it held up to that one had started: each fails,
        unless crash retries allow it another run.  Tasks after it never reached user
        code: each goes back to the front of the queue (at most ``max_redispatch``
        times).  ``force`` (the pool is being killed) fails them all."""
        held = self._held.pop(holder, None) or deque()
        started_upto = -1
        for i, task in enumerate(held):
            if task.id == last_started:
                started_upto = i
        lost: list[Lost] = []
        requeue: list[Task] = []
        for i, task in enumerate(held):
            self.in_flight.pop(task.id, None)
            self.takeable.discard(task.id)
            task.holder = None
            if task.done:
                continue
            if i <= started_upto:
                task.crashes += 1
                if task.crashes <= self.max_crash_retries and not force:
                    requeue.append(task)
                    continue
                detail = f"poison task: {task.crashes} workers died running it" if task.crashes > 1 else ""
                lost.append(Lost(task, True, detail))
            elif task.retries >= self.max_redispatch or force:
                detail = "the pool was stopped" if force else f"its worker died {task.retries + 1} times before it could start"
                lost.append(Lost(task, False, detail))
            else:
                task.retries += 1
                requeue.append(task)
        self.queue.extendleft(reversed(requeue))
        return Settlement(lost, requeue)

    def forget_holder(self, holder: Hashable) -> None:
        """A holder whose tasks were settled (or that never had any) is gone."""
        self._held.pop(holder, None)

    # -- the end ----------------------------------------------------------------------

    def everything(self) -> list[Task]:
        """Every task not yet answered, in flight or queued, out of the ledger (the pool is
        stopping or broken: they all fail with one cause)."""
        tasks = [t for t in self.in_flight.values()]
        for task in tasks:
            task.holder = None
        self.in_flight.clear()
        self._held.clear()
        self.takeable.clear()
        tasks.extend(self.drain_queue())
        return tasks

    def __len__(self) -> int:
        """Tasks in flight."""
        return len(self.in_flight)
