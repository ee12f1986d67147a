"""The supervisor's worker-facing I/O: reading each worker's channel, sending it
its calls, delivering outcomes, and settling a worker's death.

This is one layer of the supervisor (``prefork._supervisor``); below it are the
parts with no I/O, which decide (``prefork._ledger``: tasks; ``prefork._workers``:
workers, their timers and what an exit means; ``prefork._dispatch``: which task
goes where), above it the loop (``prefork._loop``: spawning, timers, scaling,
shutdown) and the public API.  :class:`PoolState` declares what every layer
shares; the supervisor's ``__init__`` sets it all.
"""

from __future__ import annotations

import logging
import os
import selectors
import struct
import threading
import time
from collections import deque
from typing import Any, Final

from prefork import _frames, _scoreboard
from prefork._call import Caller, decode_error
from prefork._dispatch import FRAME_BYTES, auto_prefetch, fill, takeable
from prefork._ledger import Ledger
from prefork._scaler import Scaler
from prefork._spawn import DirectSpawner, ForkServer
from prefork._status import Tally
from prefork._takeback import take_back
from prefork._task import Task
from prefork._worker import EXIT_BOOT_FAILED, WorkerContext
from prefork._workers import BOOTING, READY, RETIRING, Worker, WorkerTable, verdict
from prefork.errors import PoolBroken, WorkerLost, describe_status
from prefork.strategies.resolver import MethodResolver
from prefork.strategies.serializer import Serializer
from prefork.strategies.sink import ResultSink
from prefork.strategies.transport import Transport

log = logging.getLogger("prefork.supervisor")

_TAKE_RETRY_FIRST: Final = 0.001  #: seconds before a take-back that met a held slot lock looks again
_TAKE_RETRY_MAX: Final = 0.1  #: the longest such wait, while the lock stays held

EOF_GRACE: Final = 5.0  #: seconds a worker may live on after closing its channel


class PoolState:
    """What the supervisor's layers share (set by ``Supervisor.__init__``)."""

    config: Any
    hook: Any
    serializer: Serializer
    resolver: MethodResolver
    transport: Transport
    sink: ResultSink
    ctx: WorkerContext
    scoreboard: _scoreboard.Scoreboard
    spawner: ForkServer | DirectSpawner
    ledger: Ledger
    queue: deque[Task]
    table: WorkerTable
    tally: Tally
    _scaler: Scaler
    _tasks: dict[int, Task]
    _deadlines: list[tuple[float, int]]
    _loads: Any
    _sel: selectors.DefaultSelector
    _lock: threading.Lock
    _inline: Caller | None
    _avg_task: float | None
    _take_retry: float  #: a take-back met a held slot lock: look again within this many seconds (0: no)
    _broken: PoolBroken | None
    _closing: bool
    _stopped: bool
    _started: bool
    _force: bool
    one_at_a_time: bool
    self_feeding: bool
    events: int
    prefetch: int
    max_frame: int
    max_tasks: int
    boot_timeout: float

    def _retire(self, w: Worker, reason: str, cause: str, kill: bool = False, replace: bool = False) -> None:
        raise NotImplementedError  # the loop's (prefork._loop)

    def _boot_failed(self, why: str) -> None:
        raise NotImplementedError  # the loop's (prefork._loop)


class WorkerIO(PoolState):
    """Channels, frames, outcomes and deaths (see the module text)."""

    def _on_channel(self, fd: int, mask: int) -> None:
        w = self.table.by_fd(fd)
        if w is None:
            return
        if mask & selectors.EVENT_WRITE:
            w.channel.flush()
            if not w.channel.wants_write():
                self._sel.modify(fd, selectors.EVENT_READ, self._on_channel)
        if mask & selectors.EVENT_READ:
            self._read_channel(w)
            if w.eof and w.status is not None:
                self._judge(w)

    def _read_channel(self, w: Worker) -> int:
        """Handle the frames ``w`` sent that arrived; returns how many there were."""
        try:
            frames = w.channel.read()
        except EOFError:
            self._on_eof(w)
            return 0
        except Exception as exc:  # not frames: something else wrote into its socket
            self._on_broken_channel(w, exc)
            return 0
        if frames:
            self.events += 1
        for frame in frames:
            kind = frame[0]
            if kind == _frames.RESULTS:
                try:
                    self._on_results(w, frame)
                except struct.error as exc:
                    self._on_broken_channel(w, exc)
                    return 0
            elif kind == _frames.READY:
                if w.state == BOOTING:  # one retired while it booted stays retiring
                    w.state = READY
                w.idle_since = time.monotonic()
                self._scaler.booted()
            elif kind == _frames.BOOTFAIL:
                w.boot_error = frame[1:].decode("utf-8", "replace")
            elif kind == _frames.LEAVING:
                reason = frame[1:].decode("utf-8", "replace")
                if self.self_feeding:
                    w.state = RETIRING  # it is on its way out
                    w.reason = reason
                    w.cause = "max-rss" if reason.startswith("memory grew") else "recycled"
                else:  # a task worker asks to be recycled: STOP follows what it holds
                    self._retire(w, reason, "max-rss" if reason.startswith("memory grew") else "recycled", replace=True)
            elif kind == _frames.DATA:
                try:
                    payload, code = _frames.decode_data(frame)
                    data = self._loads(payload)
                except BaseException as exc:  # user data: what it raises is what the hook gets
                    data, code = exc, None
                try:
                    self.hook.prefork_child_data(worker=w.info, data=data, exitcode=code)
                except BaseException:
                    log.exception("a prefork_child_data hook failed")
        return len(frames)

    def _on_broken_channel(self, w: Worker, exc: BaseException, sending: bool = False) -> None:
        """``w``'s channel is unusable: it carries bytes that are not frames (its task
        wrote into the socket, say), or the transport refused to send.  That worker
        alone is lost: it is killed; its running task fails, the others go back."""
        if not w.lost_reason:
            hint = "the transport could not send to it" if sending else "did its task write to the worker's socket?"
            w.lost_reason = f"its channel broke ({exc}); {hint}"
            self._log(logging.ERROR, f"worker {w.pid}: {w.lost_reason} Killing it.")
        w.boot_error = w.boot_error or (w.lost_reason if w.state == BOOTING else "")
        self._on_eof(w)
        self._retire(w, w.lost_reason, "broken-channel", kill=True)

    def _on_eof(self, w: Worker) -> None:
        if w.eof:
            return
        w.eof = True
        fd = w.channel.fileno()
        self._sel.unregister(fd)
        self.table.unwatch(fd)
        self.ctx.internal_fds.discard(fd)
        w.channel.close()
        if w.lost:
            self._judge(w)
        elif w.status is None:
            # the exit status follows; a worker that closed its channel but lives on is killed
            w.kill_at = min(w.kill_at, time.monotonic() + EOF_GRACE)

    def _on_results(self, w: Worker, frame: Any) -> None:
        in_flight = self._tasks
        inflight = w.inflight
        loads = self._loads
        for tid, status, t0, t1, payload in _frames.decode_results(frame):
            task = in_flight.get(tid)  # Ledger.held_task, inline on this hot path
            if task is None or task.holder is not w:
                continue  # late (its task was answered: timed out), or not this worker's task
            task.started_at = t0
            task.finished_at = t1
            avg = self._avg_task
            self._avg_task = t1 - t0 if avg is None else avg + 0.1 * (t1 - t0 - avg)
            if status == _frames.OK:
                try:
                    value = loads(payload)
                except BaseException as exc:  # user data: whatever it raises is this task's outcome
                    exc.add_note(f"prefork: the result of task {tid} could not be decoded with {self.serializer.name!r}")
                    self._settle(w, task, False, exc)
                    continue
                self._settle(w, task, True, value)
            else:
                self._settle(w, task, False, decode_error(self.serializer, payload))
        if not inflight:
            w.idle_since = time.monotonic()

    def _settle(self, w: Worker, task: Task, ok: bool, value: Any) -> None:
        """``task``, held by ``w``, has its outcome: deliver it, then forget the task
        (in that order: if delivering fails, the task is still on the books)."""
        self._finish(task, ok, value)
        self.ledger.release(task)

    def _finish(self, task: Task, ok: bool, value: Any) -> None:
        if task.done:
            return
        task.done = True
        if not task.finished_at:
            task.finished_at = time.monotonic()
        self.tally.outcome(task, ok, value)
        try:
            self.sink.deliver(task, ok, value)
        except BaseException as exc:  # a sink's or a done-callback's, even SystemExit: never the loop's end
            if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                raise  # Ctrl-C in the caller's own thread (a stepped loop) is the caller's
            log.exception("result sink %r failed to deliver %r", self.sink, task)

    def _fail_everything(self, exc: BaseException) -> None:
        for task in self.ledger.everything():
            self._finish(task, False, exc)

    def _dispatch(self) -> None:
        retry, self._take_retry = self._take_retry, 0.0
        if not self.queue and not (self.ledger.takeable and self._take_back(retry)):
            return
        ready = self.table.ready()
        if not ready:
            return
        sent_takeable = False
        if self.one_at_a_time:
            per = 1  # a running task can be cancelled by killing its worker: nothing else is there
        elif self.prefetch:
            per = self.prefetch
        else:
            per = auto_prefetch(self._avg_task, len(self.queue), self.table.alive())
            sent_takeable = takeable(self._avg_task, per)
        frame_bytes = min(self.max_frame or FRAME_BYTES, FRAME_BYTES)
        frames = fill(self.queue, ready, per, frame_bytes, self.sink.claim, self.ledger.give, self._fail, time.monotonic())
        if sent_takeable:
            marked = self.ledger.takeable
            for _, items in frames:
                marked.update(tid for tid, _ in items)
        for w, items in frames:
            self._send_calls(w, items, sent_takeable)
        if self.max_tasks:
            for w, _ in frames:
                if w.budget == 0 and w.state != RETIRING:  # its last tasks: STOP follows them, the replacement forks now
                    self._retire(w, f"max_tasks_per_child reached ({self.max_tasks})", "max-tasks", replace=True)

    def _take_back(self, retry: float = 0.0) -> bool:
        """The queue is empty and some worker holds a takeable task: if a worker is
        idle, take such a task back for it (``prefork._takeback``).  True if any was.
        Not from a worker given its last budgeted task: it runs exactly its budget.
        A slot lock held by its worker (claiming, for microseconds) sets a retry: the
        loop looks again in 1 ms, then 2, 4 ... at most 100 ms while it stays held
        (``retry``: the last wait), instead of at its next event or tick."""
        free = sum(1 for w in self.table.ready() if not w.inflight)
        if not free:
            return False
        holders = [w for w in self.table.all() if len(w.inflight) > 1 and not w.eof and w.budget != 0]
        taken, busy = take_back(self.ledger, self.scoreboard, free, holders)
        if busy:
            self._take_retry = min(_TAKE_RETRY_MAX, retry * 2) if retry else _TAKE_RETRY_FIRST
        return taken > 0

    def _fail(self, task: Task, exc: BaseException) -> None:
        self._finish(task, False, exc)

    def _send_calls(self, w: Worker, items: list[tuple[int, _frames.Payload]], as_takeable: bool = False) -> None:
        try:
            _frames.send_pieces(w.channel, _frames.call_pieces(items, as_takeable))
        except Exception as exc:  # a transport's send refused: that worker's channel is unusable
            self._on_broken_channel(w, exc, sending=True)  # its tasks: sent back (never started) or failed as it dies
            return
        if w.channel.wants_write():
            self._sel.modify(w.channel.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_channel)

    def _run_inline(self) -> None:
        """No workers (the policy allows none): run queued tasks here, one by one."""
        assert self._inline is not None
        queue = self.queue
        while queue:
            task = queue.popleft()
            if task.done or not self.sink.claim(task):
                continue
            payload = task.payload
            record = self._inline.call(task.id, payload if type(payload) is bytes else b"".join(payload))
            self._on_results_record(task, record)

    def _on_results_record(self, task: Task, record: tuple[Any, ...]) -> None:
        frame = b"".join((_frames.RESULTS_HEAD, *record))
        here = Worker(-1, 0, 0.0, -1)  # this process, as the holder of the task it runs
        here.inflight = self.ledger.held(here)
        self.ledger.give(here, task, time.monotonic())
        self._on_results(here, frame)
        self.ledger.forget_holder(here)

    def _judge(self, w: Worker) -> None:
        """The worker's channel is closed and its exit status known: settle its tasks."""
        if not self.table.holds(w):
            return
        if w.inflight:
            # results it computed but had not sent wait in its slot's result area
            buffered = self.scoreboard.buffered(w.slot)
            if buffered:
                try:
                    self._on_results(w, buffered)
                except struct.error:
                    self._log(logging.WARNING, f"worker {w.pid} left a result area that does not decode; ignored")
        last_started, _ = self.scoreboard.task(w.slot)
        status = w.status
        settlement = self.ledger.settle_death(w, last_started, force=self._force)
        self._release(w)
        for lost in settlement.lost:
            detail = lost.detail or (w.lost_reason if lost.started else "")
            self._finish(lost.task, False, WorkerLost(w.pid, status, started=lost.started, detail=detail))
        initializer_failed = status is not None and os.WIFEXITED(status) and os.waitstatus_to_exitcode(status) == EXIT_BOOT_FAILED
        said = describe_status(status)
        judged = verdict(w, self._closing, initializer_failed, said)
        self.tally.exits[judged.cause] += 1
        if judged.boot_failure:
            self._boot_failed(judged.boot_failure)
        elif not judged.expected:
            self._log(logging.WARNING, f"worker {w.pid} died unexpectedly ({said}); replacing it")
        reason = w.reason or ("stopped" if judged.expected else f"died ({said})")
        if judged.expected:
            self._log(logging.INFO, f"worker {w.pid} left: {reason} ({said})")
        try:
            self.hook.prefork_worker_exited(worker=w.info, status=status, reason=reason)
        except BaseException:
            log.exception("a prefork_worker_exited hook failed")
        if not judged.expected:
            self._scaler.soon()  # let the policy replace it now (a retired one was replaced already)

    def _release(self, w: Worker) -> None:
        """Forget ``w``: its tasks (settled by now), its slot, its channel."""
        self.ledger.forget_holder(w)
        fd = -1
        if w.channel is not None and not w.eof:
            fd = w.channel.fileno()
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            self.ctx.internal_fds.discard(fd)
            w.channel.close()
            w.eof = True
        self.table.remove(w, fd)
        self.scoreboard.reset(w.slot)

    def _log(self, level: int, message: str) -> None:
        log.log(level, message)
        try:
            self.hook.prefork_log(level=level, message=message)
        except BaseException:
            log.exception("a prefork_log hook failed")
