"""The task ledger under random event sequences (hypothesis stateful testing).

A model of workers drives the ledger the way the supervisor does: submit,
dispatch (the sink may refuse a cancelled task), a worker starting its next
task, finishing it (the result is that task's outcome), dying at any moment,
a running task timing out or being cancelled (its worker is killed), stray and
late results, recycling.  After every step, and when everything has drained:
every task has at most one outcome, none ran twice (crash retries off), a task
that never started is never reported as having run, and at the end every task
has exactly one outcome.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prefork._ledger import MAX_REDISPATCH, Ledger
from prefork._task import Task


class _Worker:
    """A worker as the supervisor sees it: a key for the ledger, and what it has run."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.last_started = 0  # the scoreboard's TASK word
        self.started: set[int] = set()  # it runs what it holds in order, each once
        self.running: Task | None = None  # started, no result yet
        self.alive = True

    def __repr__(self) -> str:
        return f"<worker {self.n}>"


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(max_crash_retries=0)
        self.workers: list[_Worker] = []
        self.serial = 0
        self.ids = 0
        self.tasks: list[Task] = []
        self.outcomes: Counter[int] = Counter()
        self.kinds: dict[int, str] = {}
        self.runs: Counter[int] = Counter()  # times user code started
        self.now = 0.0
        for _ in range(2):
            self._fork()

    def _fork(self) -> None:
        self.serial += 1
        self.workers.append(_Worker(self.serial))

    def _finish(self, task: Task, kind: str) -> None:
        assert not task.done, f"task {task.id} answered twice ({self.kinds.get(task.id)}, then {kind})"
        task.done = True
        self.outcomes[task.id] += 1
        self.kinds[task.id] = kind

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    # -- events --------------------------------------------------------------------------

    @rule(n=st.integers(1, 5), timeout=st.sampled_from([None, None, 1.0]))
    def submit(self, n: int, timeout: float | None) -> None:
        for _ in range(n):
            self.ids += 1
            task = Task(self.ids, "f", (), {}, timeout)
            self.tasks.append(task)
            self.ledger.queue.append(task)

    @rule(pick=st.integers(0, 9), room=st.integers(1, 4), refuse=st.booleans())
    def dispatch(self, pick: int, room: int, refuse: bool) -> None:
        alive = self._alive()
        if not alive:
            return
        w = alive[pick % len(alive)]
        for _ in range(room):
            task = self.ledger.take()
            if task is None:
                return
            if not task.claimed:
                if refuse and task.id % 3 == 0:  # cancelled while queued: the sink says no
                    self._finish(task, "cancelled")
                    continue
                task.claimed = True
            self.ledger.give(w, task, self.now)

    @rule(pick=st.integers(0, 9))
    def start_next(self, pick: int) -> None:
        alive = self._alive()
        if not alive:
            return
        w = alive[pick % len(alive)]
        if w.running is not None:
            return
        held = self.ledger.held(w)
        # the next task in the order it was given that this worker has not started yet
        for task in held:
            if task.id not in w.started:
                w.started.add(task.id)
                w.last_started = task.id
                w.running = task
                self.runs[task.id] += 1
                return

    @rule(pick=st.integers(0, 9), ok=st.booleans())
    def finish_running(self, pick: int, ok: bool) -> None:
        alive = self._alive()
        if not alive:
            return
        w = alive[pick % len(alive)]
        task = w.running
        if task is None:
            return
        w.running = None
        got = self.ledger.held_task(w, task.id)
        if got is None:
            return  # answered already (timed out, cancelled): a late result is nobody's
        self._finish(got, "ok" if ok else "error")
        self.ledger.release(got)

    @rule(pick=st.integers(0, 9), tid=st.integers(0, 60))
    def stray_result(self, pick: int, tid: int) -> None:
        """A record naming a task the worker does not hold (forged, corrupt, late)."""
        alive = self._alive()
        if not alive:
            return
        w = alive[pick % len(alive)]
        task = self.ledger.held_task(w, tid)
        if task is not None:
            assert task.holder is w
            assert task in self.ledger.held(w)

    @rule(pick=st.integers(0, 9))
    def die(self, pick: int) -> None:
        alive = self._alive()
        if not alive:
            return
        self._kill(alive[pick % len(alive)])

    def _kill(self, w: _Worker) -> None:
        w.alive = False
        settlement = self.ledger.settle_death(w, w.last_started)
        for lost in settlement.lost:
            if lost.started:
                assert self.runs[lost.task.id] >= 1, "a task that never started was reported as started"
            else:
                assert self.runs[lost.task.id] == 0 or lost.task.crashes == 0
            self._finish(lost.task, "lost")
        for task in settlement.requeued:
            assert self.runs[task.id] == 0 or w.running is not task or task.crashes, "a started task went back"
        w.running = None
        self._fork()

    @rule(pick=st.integers(0, 9), cancel=st.booleans())
    def stop_running(self, pick: int, cancel: bool) -> None:
        """A running task times out or is cancelled: it is answered, its worker killed."""
        alive = self._alive()
        if not alive:
            return
        w = alive[pick % len(alive)]
        task = w.running
        if task is None or self.ledger.holder_of(task) is not w:
            return
        self._finish(task, "cancelled" if cancel else "timeout")
        self.ledger.release(task)
        self._kill(w)  # the kill: what else it held is settled as in any death

    @rule()
    def timers(self) -> None:
        self.now += 0.5
        for task in list(self.ledger.due(self.now)):
            holder = self.ledger.holder_of(task)
            assert holder is not None and task in self.ledger.held(holder)
            self.ledger.defer(task, self.now + 1.0)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def each_outcome_once_and_nothing_ran_twice(self) -> None:
        assert all(count == 1 for count in self.outcomes.values())
        assert all(count == 1 for count in self.runs.values()), "a task ran twice"

    @invariant()
    def in_flight_matches_holders(self) -> None:
        total = 0
        for w in self.workers:
            held = self.ledger.held(w) if w.alive else ()
            for task in held:
                assert task.holder is w and self.ledger.in_flight[task.id] is task
            total += len(held)
        assert total == len(self.ledger.in_flight)
        queued = {t.id for t in self.ledger.queue if not t.done}
        assert not queued & set(self.ledger.in_flight), "a task both queued and in flight"

    @invariant()
    def every_task_is_somewhere(self) -> None:
        queued = {t.id for t in self.ledger.queue}
        for task in self.tasks:
            assert task.done or task.id in queued or task.id in self.ledger.in_flight, f"task {task.id} was lost"
            assert task.retries <= MAX_REDISPATCH

    def teardown(self) -> None:
        # drain: every worker runs what it holds, then the queue goes round until empty
        for _ in range(10_000):
            if not self.ledger.queue and not self.ledger.in_flight:
                break
            self.dispatch(0, 4, False)
            for i in range(len(self.workers)):
                self.start_next(i)
                self.finish_running(i, True)
        for task in self.tasks:
            assert self.outcomes[task.id] == 1, f"task {task.id} ended with {self.outcomes[task.id]} outcomes"


TestLedger = LedgerMachine.TestCase
TestLedger.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def _task(i: int, timeout: float | None = None) -> Task:
    return Task(i, "f", (), {}, timeout)


def test_a_death_fails_the_started_tasks_and_sends_back_the_rest_in_order() -> None:
    ledger = Ledger()
    w: Any = object()
    tasks = [_task(i) for i in range(1, 6)]
    for t in tasks:
        t.claimed = True
        ledger.give(w, t, 0.0)
    settlement = ledger.settle_death(w, last_started=2)
    assert [(lost.task.id, lost.started) for lost in settlement.lost] == [(1, True), (2, True)]
    assert [t.id for t in settlement.requeued] == [3, 4, 5]
    assert [t.id for t in ledger.queue] == [3, 4, 5]
    assert not ledger.in_flight and all(t.holder is None for t in tasks)
    assert all(t.claimed for t in settlement.requeued), "a re-dispatched task is not claimed again"


def test_a_task_sent_back_too_often_fails_as_never_started() -> None:
    ledger = Ledger()
    task = _task(1)
    for round_ in range(MAX_REDISPATCH + 1):
        w = object()
        assert ledger.take() in (None, task)
        ledger.give(w, task, 0.0)
        settlement = ledger.settle_death(w, last_started=0)
        if round_ < MAX_REDISPATCH:
            assert settlement.requeued == [task]
            ledger.take()
        else:
            assert [(lost.task, lost.started) for lost in settlement.lost] == [(task, False)]
            assert "died 4 times before it could start" in settlement.lost[0].detail


def test_crash_retries_run_a_started_task_again_then_call_it_poison() -> None:
    ledger = Ledger(max_crash_retries=1)
    task = _task(1)
    w1, w2 = object(), object()
    ledger.give(w1, task, 0.0)
    assert ledger.settle_death(w1, last_started=1).requeued == [task]
    assert ledger.take() is task
    ledger.give(w2, task, 0.0)
    lost = ledger.settle_death(w2, last_started=1).lost
    assert lost[0].started and "poison task: 2 workers died running it" in lost[0].detail


def test_results_are_matched_to_their_holder_only() -> None:
    ledger = Ledger()
    a, b = object(), object()
    t1, t2 = _task(1), _task(2)
    ledger.give(a, t1, 0.0)
    ledger.give(b, t2, 0.0)
    assert ledger.held_task(a, 1) is t1
    assert ledger.held_task(a, 2) is None, "b's task cannot be answered by a"
    assert ledger.held_task(a, 99) is None
    ledger.release(t1)
    assert ledger.held_task(a, 1) is None and len(ledger) == 1


def test_deadlines_come_due_in_order_and_skip_answered_tasks() -> None:
    ledger = Ledger()
    w = object()
    t1, t2, t3 = _task(1, 1.0), _task(2, 3.0), _task(3, 2.0)
    for t in (t1, t2, t3):
        ledger.give(w, t, 0.0)
    ledger.release(t3)
    assert [t.id for t in ledger.due(2.5)] == [1]
    assert ledger.next_deadline() == 3.0
    assert [t.id for t in ledger.due(10.0)] == [2]


def test_force_fails_everything_a_dead_worker_held() -> None:
    ledger = Ledger(max_crash_retries=5)
    w = object()
    tasks = [_task(i) for i in (1, 2, 3)]
    for t in tasks:
        ledger.give(w, t, 0.0)
    settlement = ledger.settle_death(w, last_started=1, force=True)
    assert not settlement.requeued and [lost.started for lost in settlement.lost] == [True, False, False]
    assert settlement.lost[1].detail == "the pool was stopped"


def test_the_census_counts_each_worker_once_by_state() -> None:
    from prefork import _scoreboard
    from prefork._workers import BOOTING, READY, RETIRING, Worker, census

    def worker(slot: int, state: int, holding: int = 0, idle_since: float = 0.0) -> Worker:
        w = Worker(slot, slot, idle_since, -1)
        w.state = state
        w.idle_since = idle_since
        for i in range(holding):
            w.inflight.append(Task(i, "f", (), {}))
        return w

    workers = [worker(0, BOOTING), worker(1, READY, idle_since=7.0), worker(2, READY, holding=2),
               worker(3, RETIRING, holding=1), worker(4, READY, idle_since=4.0)]
    count = census(workers, now=10.0)
    assert count == (4, 1, 2, 1, 1, 6.0)  # alive, booting, idle, busy, retiring, longest idle

    class Board:  # self-feeding workers say busy/idle in their slot
        def state(self, slot: int) -> int:
            return _scoreboard.BUSY if slot == 1 else _scoreboard.IDLE

        def since(self, slot: int) -> float:
            return 9.0

    count = census(workers, now=10.0, board=Board())
    assert (count.idle, count.busy, count.longest_idle) == (1, 2, 1.0)
