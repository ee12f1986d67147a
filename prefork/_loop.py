"""The supervisor's loop layer: spawning and the spawner's events, the timers
(task timeouts with their stack dumps, boot and kill deadlines, worker ages),
scaling, retiring workers, and the stages of a shutdown.

It sits on :class:`prefork._worker_io.WorkerIO` (channels, outcomes, deaths)
and under the public :class:`prefork._supervisor.Supervisor`; what to do is
decided by the parts with no I/O (``prefork._scaler``, ``prefork._workers``,
``prefork._ledger``), what is done is here.
"""

from __future__ import annotations

import logging
import math
import os
import random
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any, Final

from prefork import _frames, _scoreboard
from prefork._lifetime import live_pools
from prefork._operate import Endpoints
from prefork._spawn import Event, ForkServer, Spawned, SpawnFailed
from prefork._stack import own_frames
from prefork._task import Task, WorkerInfo
from prefork._worker import STACK_SIGNAL, read_stack
from prefork._worker_io import WorkerIO, log
from prefork._workers import BOOTING, READY, RETIRING, Worker
from prefork.errors import PoolBroken, PoolShutDown, TaskTimeout
from prefork.strategies import optional

STACK_WAIT: Final = 0.25  #: seconds a timed-out worker gets to dump its stack before the kill
_DRAIN_READS: Final = 1024  #: reads of a dead worker's channel at most (a live grandchild may keep writing)


class PoolLoop(WorkerIO):
    """Spawning, timers, scaling, retiring and shutdown (see the module text)."""

    _wake_r: int
    _wake_w: int
    _sleeping: bool
    _spawner_fds: set[int]
    _cancels: deque[Task]
    _reloads: deque[tuple[str, bool]]
    _chain: deque[int]  # serials of the workers a chain reload has yet to replace
    _chain_reason: str
    _chain_current: int  # the serial of the worker it retired last (0: none)
    _chain_target: int  # workers serving when it began: each step waits for the pool to be back there
    _chain_ticks: int  # the policy's tick count when the last one left (-1: it has not yet)
    endpoints: Endpoints
    _serials: Any
    _states: tuple[int, ...]
    _done_event: threading.Event
    last_spawned: int
    body: Any
    max_tasks_jitter: int
    max_worker_age: float
    max_boot_failures: int
    kill_grace: float
    graceful_timeout: float
    busy_timeout: float
    waiting: Callable[[], int] | None

    def _wake(self) -> None:
        """Make the loop's ``select`` return.  Safe from any thread and from a signal
        handler: a handler runs on the main thread between any two bytecodes, maybe
        while that thread holds ``_lock``, so there it never waits for the lock.  If
        the lock is taken, its holder is awake (the loop) or wakes the loop itself
        right after (``submit``, ``shutdown``); the write is skipped, never blocked on."""
        self._sleeping = False
        if threading.current_thread() is threading.main_thread():
            if not self._lock.acquire(blocking=False):
                return
        else:
            self._lock.acquire()  # no signal handler runs on this thread: waiting is safe
        try:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass  # full: the loop is awake anyway
        finally:
            self._lock.release()

    def _step_body(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            key.data(key.fd, mask)
        if self._cancels:
            self._do_cancels()
        while self._reloads:
            reason, chain = self._reloads.popleft()
            if chain:
                self._chain = deque(w.serial for w in self.table.all() if w.state != RETIRING)
                self._chain_reason, self._chain_current, self._chain_target = reason, 0, len(self._chain)
            else:
                self._retire_every_worker(reason)
        if self._chain or self._chain_current:
            self._advance_chain()
        for event in self.spawner.take_ready():
            self._on_spawner_event(event)
        if self._inline is not None:
            self._run_inline()
        else:
            self._dispatch()
        now = time.monotonic()
        if self.self_feeding:
            states = tuple(self.scoreboard.state(slot) for slot in self.table.by_slot)
            if states != self._states:
                self._states = states
                self.events += 1
        self._timers(now)
        for event in self.spawner.take_ready():  # a direct fork is done at once
            self._on_spawner_event(event)
        if self._closing:
            self._progress_shutdown(now)

    def _next_wait(self, now: float) -> float:
        """Seconds the loop may sleep: until the next tick, deadline, kill or boot timeout."""
        wait = min(self._scaler.next_tick, self.table.next_deadline(self.boot_timeout)) - now
        if self.max_worker_age and not self.self_feeding:
            wait = min(wait, 0.25)  # ages are looked at a few times a second
        if self._deadlines:
            wait = min(wait, self._deadlines[0][0] - now)
        if self._closing:
            wait = min(wait, 0.05)
        if self.busy_timeout:
            wait = min(wait, 0.1)  # busy times are looked at ten times a second
        if self._take_retry:
            wait = min(wait, self._take_retry)  # a take-back met a held slot lock
        return max(0.0, min(wait, 1.0))

    def _on_wake(self, fd: int, mask: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _sync_spawner_fds(self) -> None:
        fds = set(self.spawner.fds())
        for fd in self._spawner_fds - fds:
            self._sel.unregister(fd)
        self.spawner.close_spent()  # only now: an fd is closed after the selector forgot it
        for fd in fds - self._spawner_fds:
            self._sel.register(fd, selectors.EVENT_READ, self._on_spawner_readable)
        self._spawner_fds = fds

    def _on_spawner_readable(self, fd: int, mask: int) -> None:
        for event in self.spawner.on_readable(fd):
            self._on_spawner_event(event)
        self._sync_spawner_fds()
        if not self.spawner.alive() and not self._stopped:
            if self._drained():
                return  # it left, as asked, after its last worker
            self._fork_server_lost()

    def _drained(self) -> bool:
        """The fork server was asked to drain and none of its workers is left without
        an exit status: its end of stream is the leaving it was asked for."""
        spawner = self.spawner
        if not isinstance(spawner, ForkServer) or not spawner.draining:
            return False
        return all(w.status is not None or (w.pid and spawner.forked_here(w.pid)) for w in self.table.all())

    def _fork_server_lost(self) -> None:
        restart = not self._closing
        self._log(logging.ERROR, "the fork server died; its workers die with it" + ("; starting a new one" if restart else ""))
        assert isinstance(self.spawner, ForkServer)
        here = self.spawner.detach_here()  # the workers forked here live on
        self._sync_spawner_fds()  # the dead server watches nothing any more
        for w in self.table.all():
            if here is not None and w.pid and here.owns(w.pid):
                continue
            w.lost = True  # no exit status will come: judge each at end of stream
            if w.pid == 0:
                self._release(w)  # its spawn request died with the server
            elif w.eof:
                self._judge(w)
        self.spawner.stop()
        if restart:
            self.spawner = ForkServer(self.ctx)
            self.spawner.stop_grace = self.boot_timeout
            self.spawner.start()
        self.spawner.adopt(here)
        self._sync_spawner_fds()

    def _spawn(self, now: float) -> None:
        budget = -1
        if self.max_tasks and not self.self_feeding:
            budget = self.max_tasks + (random.randint(0, self.max_tasks_jitter) if self.max_tasks_jitter else 0)
        serial = next(self._serials)
        w = self.table.add(serial, now, budget)
        if w is None:
            return  # every slot is taken (workers still leaving): the next tick asks again
        w.inflight = self.ledger.held(w)  # the ledger's record of what it holds, in order
        w.info = WorkerInfo(slot=w.slot, name=self.config.name, serial=serial)
        self._scaler.spawned(now)
        self.spawner.spawn(w.slot, serial)
        self._sync_spawner_fds()

    def _on_spawner_event(self, event: Event) -> None:
        self.events += 1
        if isinstance(event, Spawned):
            w = self.table.current(event.slot, event.serial)
            if w is None:
                event.sock.close()  # we gave up on it; the exit will come
                return
            pid = event.pid
            self.table.forked(w, pid)
            self.last_spawned = pid
            assert w.info is not None
            w.info.pid = pid
            w.channel = self.transport.parent_channel(event.sock)
            fd = w.channel.fileno()
            self.ctx.internal_fds.add(fd)
            self.table.watch(w, fd)
            self._sel.register(fd, selectors.EVENT_READ, self._on_channel)
            self._log(logging.INFO, f"forked worker {pid} (slot {event.slot})")
            if self._force:
                self.spawner.signal(pid, signal.SIGKILL)
        elif isinstance(event, SpawnFailed):
            w = self.table.current(event.slot, event.serial)
            if w is not None:
                self._release(w)
                self._boot_failed(event.text)
        else:
            w = self.table.by_pid(event.pid)
            if w is None:
                return
            w.status = event.status
            # Everything it wrote is in its socket now: read it, then judge without waiting
            # for end of stream, which a process it forked (a daemon) may hold off forever.
            reads = 0
            while not w.eof and w.channel is not None and self._read_channel(w) and reads < _DRAIN_READS:
                reads += 1
            self._judge(w)

    def _advance_chain(self) -> None:
        """A chain reload's next step: the worker retired last has left and none is booting
        (its replacement is ready): retire the next one still there."""
        workers = {w.serial: w for w in self.table.all()}
        if self._chain_current in workers or any(w.state == BOOTING for w in workers.values()):
            self._chain_ticks = -1
            return
        if self._chain_current:
            serving = sum(1 for w in workers.values() if w.state == READY)
            if serving < self._chain_target:  # its replacement is not up yet, unless the policy wants none
                if self._chain_ticks < 0:
                    self._chain_ticks = self._scaler.ticks
                    self._scaler.soon()
                if self._scaler.ticks <= self._chain_ticks:
                    return  # the policy has not looked since it left
        self._chain_current, self._chain_ticks = 0, -1
        if self._closing:
            self._chain.clear()
            return
        while self._chain:
            w = workers.get(self._chain.popleft())
            if w is not None and w.state != RETIRING:
                self._retire(w, self._chain_reason, "reload")
                self._chain_current = w.serial
                return

    def _retire_every_worker(self, reason: str) -> None:
        for w in self.table.all():
            if w.state != RETIRING:
                self._retire(w, reason, "reload")
        self._scaler.soon()

    def _do_cancels(self) -> None:
        while self._cancels:
            task = self._cancels.popleft()
            if task.done:
                continue
            w = self.ledger.holder_of(task)
            if w is None:  # still queued: the sink's claim() drops it
                continue
            assert isinstance(w, Worker)
            self._settle(w, task, False, CancelledError())
            self._log(logging.INFO, f"task {task.id} cancelled while running; killing worker {w.pid}")
            self._retire(w, "its running task was cancelled", "cancelled", kill=True)

    def _timers(self, now: float) -> None:
        if self._deadlines:
            for task in list(self.ledger.due(now)):
                self._check_timeout(task, now)
        for w, what in self.table.due(now, self.boot_timeout, self.max_worker_age if not self.self_feeding else 0.0):
            if what == "old":
                self._retire(w, f"max_worker_age reached ({self.max_worker_age:g} s)", "max-age", replace=True)
            elif what == "kill":
                self.spawner.signal(w.pid, signal.SIGKILL)
                w.kill_at = math.inf
            elif w.state == BOOTING and not w.boot_killed:  # "boot", unless released meanwhile
                w.boot_killed = w.stop_sent = True  # also when it was asked to stop: it cannot hear that yet
                w.boot_error = w.boot_error or f"the worker did not finish booting within boot_timeout = {self.boot_timeout:g} s"
                if w.pid:
                    self.spawner.signal(w.pid, signal.SIGKILL)
                else:  # the fork never came back
                    self._release(w)
                    self._boot_failed(f"no worker was forked within boot_timeout = {self.boot_timeout:g} s")
        if self.busy_timeout:
            self._harakiri(now)
        if self._scaler.due(now, len(self.queue)):
            self._scale(now)

    def _check_timeout(self, task: Task, now: float) -> None:
        w = self.ledger.holder_of(task)
        if w is None:
            return
        assert isinstance(w, Worker)
        current, started = self.scoreboard.task(w.slot)
        if current != task.id or w.inflight[0] is not task:
            self.ledger.defer(task, now + (task.timeout or 0.0))  # not started yet
            return
        assert task.timeout is not None
        if started + task.timeout > now:
            self.ledger.defer(task, started + task.timeout)
            return
        stack = self._stack_of(w, now)  # first its stack (faulthandler), then fail the task and kill
        if stack is None:
            self.ledger.defer(task, min(now + 0.02, w.stack_wait))
            return
        task.started_at = started
        self._settle(w, task, False, TaskTimeout(task.timeout, w.pid, stack))
        self._log(logging.WARNING, f"task {task.id} timed out after {task.timeout:g} s; killing worker {w.pid}")
        self._retire(w, "a task timed out", "timeout", kill=True)

    def _stack_of(self, w: Worker, now: float) -> str | None:
        """``w``'s Python stack, asked of it (faulthandler) on the first call; ``None`` while
        it is still being written (call again shortly); ``""`` if none came in ``STACK_WAIT``."""
        fd = self.scoreboard.words[w.slot * _scoreboard.WORDS + _scoreboard.STACKFD]
        if w.stack_wait == 0.0 and fd >= 0:
            w.stack_wait = now + STACK_WAIT
            self.spawner.signal(w.pid, STACK_SIGNAL, group=False)
        if fd >= 0 and now < w.stack_wait:
            stack = read_stack(w.pid, fd)
            if not stack or len(stack) != w.stack_seen:
                w.stack_seen = len(stack)  # still being written: look again shortly
                return None
        return own_frames(read_stack(w.pid, fd))

    def _harakiri(self, now: float) -> None:
        """Self-feeding workers busy longer than ``busy_timeout`` (``[mpm] request_timeout``):
        their stack is logged, then they are killed and replaced."""
        limit = self.busy_timeout
        board = self.scoreboard
        for w in self.table.all():
            if w.state != READY or not w.pid or board.state(w.slot) != _scoreboard.BUSY:
                continue  # a keep-alive wait is no request: keepalive_timeout bounds it
            busy_for = now - board.since(w.slot)
            if busy_for <= limit:
                w.stack_wait = 0.0  # a stack asked of an earlier, longer busy spell is stale
                continue
            stack = self._stack_of(w, now)
            if stack is None:
                continue  # the next pass looks again (the loop wakes at least every 0.1 s)
            self._log(logging.ERROR, f"worker {w.pid} was busy for {busy_for:.1f} s, more than mpm.request_timeout = "
                                     f"{limit:g} s: killing it; its stack:\n{stack.rstrip() or '(none came)'}")
            self._retire(w, "busy longer than mpm.request_timeout", "timeout", kill=True)

    def _is_idle(self, w: Worker) -> bool:
        if self.self_feeding:  # a kept-alive child (KEEPALIVE) holds its client's connection: not idle
            return self.scoreboard.state(w.slot) == _scoreboard.IDLE
        return not w.inflight

    def _retire(self, w: Worker, reason: str, cause: str, kill: bool = False, replace: bool = False) -> None:
        """Ask ``w`` to leave (STOP, or SIGTERM for self-feeding workers), or kill it.

        ``replace`` (and ``kill``) runs the policy at once, so a worker recycled or
        killed is replaced now; the policy's own retirements keep its pace.
        """
        if kill or replace:
            self._scaler.soon()
        if w.state != RETIRING:
            w.state = RETIRING
            w.reason = reason
            w.cause = cause
        if kill:
            if w.pid:
                self.spawner.signal(w.pid, signal.SIGTERM)
            w.kill_at = min(w.kill_at, time.monotonic() + self.kill_grace)
        elif self.self_feeding:  # a self-feeding worker reads no frames: SIGTERM asks it to leave
            if not w.stop_sent and w.pid:
                w.stop_sent = True
                self.spawner.signal(w.pid, signal.SIGTERM)
                w.kill_at = min(w.kill_at, time.monotonic() + self.graceful_timeout)
        elif not w.stop_sent and w.channel is not None and not w.eof:
            w.stop_sent = True
            w.channel.send(_frames.STOP_FRAME)

    def _scale(self, now: float) -> None:
        if self._broken is not None or self._stopped:
            return
        if self._closing and not self.queue:
            return
        count = self.table.census(now, self.scoreboard if self.self_feeding else None)
        queued = len(self.queue)
        if self.waiting is not None:
            try:
                queued += max(0, int(self.waiting()))
            except Exception:
                log.exception("reading the work waiting outside the queue failed; the policy sees the queue only")
        step = self._scaler.tick(now, count, queued)
        for _ in range(step.spawn):
            self._spawn(now)
        if step.retire:
            idle_workers = sorted(
                (w for w in self.table.all() if w.state == READY and self._is_idle(w)),
                key=lambda w: w.idle_since,
            )
            for w in idle_workers[: step.retire]:
                self._retire(w, "retired by the scaling policy", "scaled-down")

    def _boot_failed(self, why: str) -> None:
        n = self._scaler.boot_failures + 1
        if n >= self.max_boot_failures:
            self._scaler.boot_failures = n
            broken = PoolBroken(f"workers failed to boot {n} times in a row; the pool is broken. Last failure:\n{why}")
            with self._lock:
                self._broken = broken
                self._closing = True
            self._log(logging.ERROR, str(broken))
            self._fail_everything(broken)
            return
        delay = self._scaler.boot_failed(time.monotonic())
        self._log(logging.WARNING, f"a worker failed to boot ({n} in a row); retrying in {delay:g} s:\n{why}")

    def _progress_shutdown(self, now: float) -> None:
        if self._force:
            for w in self.table.all():
                if w.pid and w.kill_at == math.inf:
                    self.spawner.signal(w.pid, signal.SIGKILL)
                    w.kill_at = now + 1.0
                w.state = RETIRING
                w.cause = w.cause or "shutdown"
            for w in self.table.all():
                if w.state == BOOTING and not w.pid:
                    self._release(w)
        if self.queue and self._broken is None and not self._force:
            return  # still draining
        if self.queue:
            self._fail_everything(self._broken or PoolShutDown("the pool was shut down"))
        if self._tasks and not self._force:
            return  # results still to come
        for w in self.table.all():
            if w.state == BOOTING and not w.pid:
                self._release(w)  # its spawn is still in the fork server's hands
                continue
            self._retire(w, "pool shut down", "shutdown")
        if isinstance(self.spawner, ForkServer) and not self._force:
            self.spawner.drain()  # it leaves with its last worker, not after the others
        if self.table:
            return
        self._teardown()

    def _teardown(self) -> None:
        if self._stopped and not self._started:
            return
        self._stopped = True
        try:
            self.spawner.stop()
        except Exception:
            log.exception("stopping the spawner failed")
        for fd in self._spawner_fds:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._spawner_fds = set()
        self._fail_everything(PoolShutDown("the pool was shut down"))
        close = optional.sink_close(self.sink)  # once, after the last outcome was delivered
        try:
            if close is not None:
                close()
        except BaseException:
            log.exception("result sink %r failed to close", self.sink)
        self.endpoints.close()
        live_pools.discard(self)
        self._close_fds()
        self._done_event.set()

    def _close_fds(self) -> None:
        with self._lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
                    self.ctx.internal_fds.discard(fd)
            self._wake_r = self._wake_w = -1
        self.ctx.internal_fds.discard(self._sel.fileno())
        self._sel.close()
        self.scoreboard.close()
