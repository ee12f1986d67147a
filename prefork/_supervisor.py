"""The supervisor: one loop that owns the workers and the queue.

Data flow::

    caller threads                     supervisor loop (thread, or stepped)          workers
    --------------                     ------------------------------------          -------
    submit() --payload--> queue ----> dispatch: CALLS frame per ready worker ----> call loop
        |                 (deque)      (batched when the queue is deep)               |
        '-- sink.attach() -> handle                                                    v
                                       read RESULTS frames <------------------- RESULTS frames
                                       sink.deliver(task, ok, value)  (exactly once per task)
                                       |
    spawner (fork server or direct) -->| ("spawned", ...) / ("exited", pid, status) events
    scoreboard (shared memory) ------->| which task a dead worker had started; idle/busy
    scaling policy <-- PoolStats ------| decide(): spawn n / retire n / next tick

The loop waits in one ``select`` on the wakeup pipe, the spawner's descriptors
and every worker channel.  A worker is judged dead only when its channel has
reached end of stream (so every result it wrote was read) and its exit status
is known.  Then each task it held either is failed (it had started: WorkerLost)
or goes back to the front of the queue (it never reached user code).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import random
import selectors
import signal
import struct
import threading
import time
import weakref
from collections import deque
from concurrent.futures import CancelledError
from typing import Any, Final

import attrs

from prefork import _frames, _scoreboard
from prefork._call import Caller, buffer_loads, decode_error, dump_parts
from prefork._ledger import Ledger
from prefork._pickle_path import find_unserializable
from prefork._scaler import Scaler
from prefork._spawn import DirectSpawner, Event, ForkServer, Spawned, SpawnFailed
from prefork._status import Tally, snapshot
from prefork._task import Task, WorkerInfo
from prefork._worker import EXIT_BOOT_FAILED, STACK_SIGNAL, WorkerContext, read_stack
from prefork._workers import BOOTING, READY, RETIRING, census
from prefork._workers import Worker as _Worker
from prefork.errors import PoolBroken, PoolShutDown, PreforkError, TaskTimeout, WorkerLost, describe_status
from prefork.plugins import pool_plugin_manager
from prefork.strategies.resolver import MethodResolver, import_object
from prefork.strategies.scaling import ScalingPolicy
from prefork.strategies.serializer import Serializer
from prefork.strategies.sink import ResultSink
from prefork.strategies.transport import Transport

log = logging.getLogger("prefork")


AUTO_BATCH: Final = 64  #: most tasks in flight per worker when the queue is deep and tasks short
SHORT_TASK: Final = 0.0002  #: tasks shorter than this (moving average, s) are batched
LONG_TASK: Final = 0.005  #: tasks longer than this go one at a time per worker
FRAME_BYTES: Final = 256 * 1024  #: a CALLS frame stops growing past this size (one large call may exceed it)
EOF_GRACE: Final = 5.0  #: seconds a worker may live on after closing its channel
STACK_WAIT: Final = 0.25  #: seconds a timed-out worker gets to dump its stack before the kill
WORKER_LIMIT: Final = 64  #: a pool may grow to this many workers at run time (or its policy's maximum, if more)
_DRAIN_READS: Final = 1024  #: reads of a dead worker's channel at most (a live grandchild may keep writing)

_NO_KWARGS: Final[dict[str, Any]] = {}  #: shared by calls without keyword arguments; never mutated

_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()
KILL_WAIT: Final = 2.0  #: seconds a stop that a Ctrl-C turned into a kill waits for the teardown


@atexit.register
def _shutdown_all() -> None:
    """At exit, stop the pools still running, waiting for their tasks as the
    standard library's pools do; a pool being killed gets ``KILL_WAIT`` at most.
    A Ctrl-C while waiting kills every pool left (bounded waits), then exits."""
    try:
        for sup in list(_live):
            try:
                if sup._force:
                    sup.join(KILL_WAIT)  # killed already (a second Ctrl-C): do not wait for it again
                else:
                    sup.shutdown(wait=True)
            except Exception:
                pass
    except KeyboardInterrupt:
        pools = list(_live)  # those not stopped yet
        for sup in pools:
            try:
                sup.shutdown(wait=False, force=True)
            except Exception:
                pass
        end = time.monotonic() + KILL_WAIT
        for sup in pools:
            sup.join(max(0.0, end - time.monotonic()))


class Supervisor:
    """Owns a pool of workers built from a :class:`prefork.config.Config`.

    ``sink`` and ``resolver`` default to the config's strategies; ``initializer``
    overrides the config's.  With ``body`` the workers feed themselves (the MPM
    profile): each runs ``body(*body_args)`` and reports busy/idle through the
    scoreboard; ``return_in_child`` (direct forks only) makes a new worker return
    into the caller's code instead (``ForkedChild`` is raised in the child).  ``threaded=False`` leaves the loop to the caller (``step``).
    ``plugins`` are hook implementations for this pool alone (a facade's own).
    """

    def __init__(
        self,
        config: Any,
        *,
        sink: Any = None,
        resolver: Any = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] | None = None,
        threaded: bool = True,
        body: Any = None,
        body_args: tuple[Any, ...] = (),
        child_signals: dict[int, Any] | None = None,
        return_in_child: bool = False,
        plugins: tuple[object, ...] = (),
    ) -> None:
        self.config = config
        pool = config.pool
        # plugins of this pool alone get a plugin manager of its own: the config's is shared
        self.pm = pool_plugin_manager(config.plugin_manager, plugins) if plugins else config.plugin_manager
        self.hook = self.pm.hook
        self._scaler = Scaler(config.create("scaling"), one_fork_per_tick=return_in_child)
        self.serializer: Serializer = config.create("serializer")
        self._loads = buffer_loads(self.serializer)
        self._dump_parts = dump_parts(self.serializer)
        self.resolver: MethodResolver = resolver if resolver is not None else config.create("resolver")
        self.transport: Transport = config.create("transport")
        self.sink: ResultSink = sink if sink is not None else config.create("sink")
        if initializer is None and pool.initializer:
            initializer = pool.initializer
            if isinstance(initializer, str):
                initializer = import_object(initializer)
        if initargs is None:
            initargs = tuple(pool.initargs)
        finalizer = pool.finalizer or None
        if isinstance(finalizer, str):
            finalizer = import_object(finalizer)
        self.max_workers = self._scaler.policy.max_workers()
        #: most workers at once, whatever the policy becomes at run time (the scoreboard's size)
        self.worker_limit = max(self.max_workers, WORKER_LIMIT) if self.max_workers else 0
        self._scaler.max_workers = self.worker_limit
        self.max_frame: int = getattr(self.transport, "max_frame", 0) or 0
        self._call_limit = _frames.MAX_PAYLOAD
        if self.max_frame:
            # a CALLS frame with one call: its kind byte, the call's header, the payload
            self._call_limit = min(self._call_limit, self.max_frame - 1 - _frames.CALL_OVERHEAD)
        self.max_tasks = pool.max_tasks_per_child
        self.max_tasks_jitter = pool.max_tasks_jitter
        self.graceful_timeout = pool.graceful_timeout
        self.body = body
        #: workers find their own work (a body, or the caller's code after kid_new) and read no frames
        self.self_feeding = body is not None or return_in_child
        self.events = 0  #: spawns, exits, data, readiness and idle/busy changes seen so far
        self.last_spawned = 0  #: pid of the newest worker
        self._states: tuple[int, ...] = ()
        self.default_timeout = pool.task_timeout or None
        self.prefetch = pool.prefetch
        self.kill_grace = pool.kill_grace
        self.boot_timeout = pool.boot_timeout
        self.max_boot_failures = pool.max_boot_failures
        self.max_crash_retries = pool.max_crash_retries
        self.max_worker_age = pool.max_worker_age
        self.threaded = threaded

        self.scoreboard = _scoreboard.Scoreboard(max(1, 2 * self.worker_limit + 2))
        self.ctx = WorkerContext(
            name=config.name,
            title=pool.worker_title.format(name=config.name),
            serializer=self.serializer,
            resolver=self.resolver,
            transport=self.transport,
            hook=self.hook,
            scoreboard=self.scoreboard,
            initializer=initializer,
            initargs=initargs,
            finalizer=finalizer,
            max_tasks=self.max_tasks if body is not None or return_in_child else 0,
            max_tasks_jitter=self.max_tasks_jitter,
            max_rss_mb=pool.max_rss_mb,
            body=body,
            body_args=tuple(body_args),
            child_signals=dict(child_signals or {}),
            return_in_child=return_in_child,
        )
        #: the bookkeeping of tasks (queue, in flight by worker, deadlines, what a death means)
        self.ledger = Ledger(max_crash_retries=pool.max_crash_retries)
        self.tally = Tally()  #: totals for status and metrics
        self._submitted = 0
        self.queue = self.ledger.queue  # the same objects, for the hot paths
        self._tasks = self.ledger.in_flight
        self._workers: dict[int, _Worker] = {}  # by slot
        self._by_pid: dict[int, _Worker] = {}
        self._by_fd: dict[int, _Worker] = {}
        self._free_slots = list(range(self.scoreboard.slots - 1, -1, -1))
        self._ids = itertools.count(1)
        self._serials = itertools.count(1)
        self._deadlines = self.ledger.deadlines
        self._avg_task: float | None = None  # moving average of task run time (s)
        self._broken: PoolBroken | None = None
        self._closing = False
        self._stopped = False
        self._force = False
        self._sleeping = False
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()  # held by the loop while it handles events
        self._direct_ok = False  # may a submitting thread dispatch (set in start)
        self._thread: threading.Thread | None = None
        self._done_event = threading.Event()
        self._inline: Caller | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.ctx.internal_fds.update((self._wake_r, self._wake_w, self._sel.fileno()))
        if pool.fork_from == "direct" or return_in_child:
            self.spawner: ForkServer | DirectSpawner = DirectSpawner(self.ctx)
        else:
            self.spawner = ForkServer(self.ctx)
            # a graceful stop waits this long for a worker still booting to finish and leave
            self.spawner.stop_grace = self.boot_timeout
        self._spawner_fds: set[int] = set()
        self._started = False
        self._cancels: deque[Task] = deque()  # running tasks to stop (KillableFuture.cancel)
        self.one_at_a_time = bool(getattr(self.sink, "cancel_running", False))
        if self.one_at_a_time:
            self.sink.killer = self.cancel_running

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
            if self.max_workers == 0:
                self._inline = Caller(
                    self.serializer, self.resolver, self.hook, WorkerInfo(slot=-1, name=self.config.name, serial=0, pid=os.getpid())
                )
            else:
                if self.threaded and isinstance(self.spawner, ForkServer):
                    # The first workers, asked for now: forked here from the main thread, or
                    # queued in the fork server's socket (it forks them when it is up).
                    self.spawner.start(first=lambda: self._scale(time.monotonic()))
                else:
                    self.spawner.start()  # the fork server forks now, before our thread exists
                self._sync_spawner_fds()
                for event in self.spawner.take_ready():  # a worker forked here: watch its channel now
                    self._on_spawner_event(event)
        except BaseException:  # a strategy or hook raised while starting: leave nothing behind
            self._teardown()
            raise
        _live.add(self)
        # Budgets (max_tasks_per_child) retire and fork from inside a dispatch: the loop's.
        self._direct_ok = self.threaded and self._inline is None and not self.max_tasks
        if self.threaded:
            self._thread = threading.Thread(target=self._run, name=f"{self.config.name}-supervisor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopped:
                self.step()
        except BaseException as exc:
            self._loop_failed(exc)

    def _loop_failed(self, exc: BaseException) -> None:
        """The loop died (a bug, or a strategy that raised): the pool is broken at once,
        every task not yet answered fails with the cause, and ``submit`` raises it."""
        log.critical("prefork supervisor loop failed", exc_info=exc)
        broken = PoolBroken(f"the supervisor loop failed: {exc!r}")
        broken.__cause__ = exc
        with self._lock:
            self._broken = broken
            self._closing = True
        try:
            self._fail_everything(broken)
        finally:
            self._teardown()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False, force: bool = False) -> None:
        """Stop taking tasks; finish (or cancel) the queue; stop every worker.

        ``force`` kills the workers at once and fails the tasks they held.  A
        ``KeyboardInterrupt`` while waiting (a second Ctrl-C, say) makes it a
        forced stop: the workers are killed, the teardown gets ``KILL_WAIT``
        seconds at most, and the interrupt is raised again.
        """
        with self._lock:
            if self._stopped and not wait:
                return
            self._closing = True
            if force:
                self._force = True
            if cancel_futures or force:
                self._cancel_queued()
        if not self._started:
            self._stopped = True
            self._done_event.set()
            self._teardown()
            return
        self._wake()
        if not wait:
            return
        try:
            if self._thread is not None:
                if self._thread is not threading.current_thread():
                    self._thread.join()
            else:
                while not self._stopped:
                    self.step()
        except KeyboardInterrupt:
            self.shutdown(wait=False, force=True)  # interrupted: kill, do not wait for the running tasks
            if self._thread is not None:
                # the event, not join(): an interrupted join() may leave the Thread marked
                # as stopped (Python 3.11), and a second join() would return at once
                if self._thread is not threading.current_thread():
                    self._done_event.wait(KILL_WAIT)
            else:
                end = time.monotonic() + KILL_WAIT
                while not self._stopped and time.monotonic() < end:
                    self.step(max(0.0, end - time.monotonic()))
            raise

    def _cancel_queued(self) -> None:
        while self.queue:
            task = self.queue.popleft()
            if not task.done:
                self._finish(task, False, CancelledError())

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the pool has stopped; True when it has."""
        return self._done_event.wait(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped

    # -- submitting ---------------------------------------------------------------

    def submit(
        self,
        method: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        context: Any = None,
        callback: Any = None,
    ) -> Any:
        """Queue one task; returns the sink's handle (a future, the task id...)."""
        if self._broken is not None:
            raise self._broken
        if self._closing:
            raise PoolShutDown("cannot schedule new tasks after shutdown")
        if self.self_feeding:
            raise RuntimeError("this pool's workers feed themselves (a worker body); it takes no tasks")
        kwargs = kwargs or _NO_KWARGS
        self._submitted = tid = next(self._ids)
        task = Task(tid, method, args, kwargs, timeout if timeout is not None else self.default_timeout, context, callback)
        task.submitted_at = time.monotonic()
        handle = self.sink.attach(task)
        try:
            parts = self._dump_parts((method, args, kwargs))
        except BaseException as exc:  # the pickler's own error, kept (PicklingError, TypeError...), with a note
            try:
                where = find_unserializable(method, self.serializer.dumps, "method")
                where = where or find_unserializable(args, self.serializer.dumps, "args")
                where = where or find_unserializable(kwargs, self.serializer.dumps, "kwargs")
            except BaseException:
                where = ""
            at = f" (at {where})" if where else ""
            exc.add_note(f"prefork: task {task.id}: its method or arguments cannot be serialized with {self.serializer.name!r}{at}")
            self._finish(task, False, exc)
            return handle
        task.payload = payload = parts[0] if len(parts) == 1 else parts
        size = len(payload) if len(parts) == 1 else _frames.payload_size(payload)
        if size > self._call_limit:
            limit, what = _frames.MAX_PAYLOAD, f"the {_frames.MAX_PAYLOAD} bytes one call can carry"
            if self.max_frame and self.max_frame - _frames.CALL_OVERHEAD < limit:
                what = f"transport.max_frame = {self.max_frame}"
            self._finish(task, False, ValueError(f"task {task.id}: its serialized call is {size} bytes, more than {what}"))
            return handle
        if not self._started:
            self.start()
        if not self._enqueue(task):
            error: PreforkError = self._broken or PoolShutDown("cannot schedule new tasks after shutdown")
            self._finish(task, False, error)
            raise error
        if self._sleeping and not self._dispatch_here():
            self._wake()
        return handle

    def _enqueue(self, task: Task) -> bool:
        """Queue ``task`` unless the pool is closing (False).  ``shutdown()`` sets
        ``_closing`` under the same lock: a task is queued before it, or refused,
        never queued after the queue's last look."""
        with self._lock:
            if self._closing:
                return False
            self.queue.append(task)
            return True

    def _dispatch_here(self) -> bool:
        """Dispatch from the submitting thread while the loop sleeps in ``select``:
        the task reaches a worker without waking the loop's thread first (one
        thread hop less per round trip).  True when the loop has nothing to do
        about it; False (the caller wakes the loop) whenever anything beyond a
        plain send happened or might be due: the loop owns everything else."""
        if not self._direct_ok or not self._step_lock.acquire(blocking=False):
            return False
        try:
            if not self._sleeping or self._closing or self._cancels:
                return False
            deadline = self._deadlines[0][0] if self._deadlines else math.inf
            self._dispatch()
            if self.queue:
                return False  # no room: the loop dispatches when a worker frees up
            return not self._deadlines or self._deadlines[0][0] >= deadline  # else its sleep is too long
        finally:
            self._step_lock.release()

    def cancel_running(self, task: Task) -> None:
        """Stop ``task`` if it is running (any thread): its worker is killed and replaced."""
        self._cancels.append(task)
        self._wake()

    def _do_cancels(self) -> None:
        while self._cancels:
            task = self._cancels.popleft()
            if task.done:
                continue
            w = self.ledger.holder_of(task)
            if w is None:  # still queued: the sink's claim() drops it
                continue
            assert isinstance(w, _Worker)
            self._settle(w, task, False, CancelledError())
            self._log(logging.INFO, f"task {task.id} cancelled while running; killing worker {w.pid}")
            self._retire(w, "its running task was cancelled", "cancelled", kill=True)

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

    def wake(self) -> None:
        """Make the loop look at the pool now (any thread, or a signal handler)."""
        self._wake()

    @property
    def broken(self) -> PoolBroken | None:
        """Why the pool cannot run tasks any more, or ``None`` while it can."""
        return self._broken

    @property
    def spawned_total(self) -> int:
        """Workers forked since the pool started."""
        return self._scaler.spawned_total

    @property
    def policy(self) -> ScalingPolicy:
        """The scaling policy in use (see ``update_policy``)."""
        return self._scaler.policy

    def update_policy(self, **changes: Any) -> Any:
        """Change the scaling policy's options while the pool runs (``min_spare=2``...),
        checked by the policy's own validators; returns the new policy.  Works for any
        attrs policy; another policy may offer ``evolve(**changes)``."""
        policy: Any = self.policy  # an attrs class, or one with evolve(): looked at below
        evolve = getattr(policy, "evolve", None)
        if evolve is not None:
            new = evolve(**changes)
        elif attrs.has(type(policy)):
            unknown = sorted(set(changes) - {f.name for f in attrs.fields(type(policy)) if f.init})
            if unknown:
                raise TypeError(f"scaling policy {getattr(policy, 'name', type(policy).__name__)!r} has no option {unknown[0]!r}")
            new = attrs.evolve(policy, **changes)
        else:
            raise TypeError(f"scaling policy {type(policy).__qualname__} cannot be changed while running "
                            "(it is no attrs class and has no evolve(**changes))")
        if new.max_workers() > self.worker_limit:
            raise ValueError(f"the pool was made for at most {self.worker_limit} workers (its scoreboard's size); "
                             f"the changed policy wants {new.max_workers()}")
        self._scaler.replace_policy(new)
        self._wake()
        return new

    @property
    def wakeup_fd(self) -> int:
        """The write end of the loop's wake pipe (non-blocking; -1 once stopped): a byte
        written there makes ``step`` return.  For ``signal.set_wakeup_fd`` on a
        ``os.dup`` of it, so that a signal wakes the loop without Python code."""
        return self._wake_w

    # -- the loop -----------------------------------------------------------------

    def step(self, timeout: float | None = None) -> None:
        """One pass: wait for events (at most ``timeout`` or until the next timer), handle them."""
        now = time.monotonic()
        wait = self._next_wait(now)
        if timeout is not None:
            wait = min(wait, timeout)
        self._sleeping = True
        if self.queue and self._has_room():
            wait = 0.0
        events = self._sel.select(max(0.0, wait))
        self._sleeping = False
        with self._step_lock:  # a submitting thread may be dispatching (_dispatch_here)
            self._step_body(events)

    def _step_body(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            key.data(key.fd, mask)
        if self._cancels:
            self._do_cancels()
        for event in self.spawner.take_ready():
            self._on_spawner_event(event)
        if self._inline is not None:
            self._run_inline()
        else:
            self._dispatch()
        now = time.monotonic()
        if self.self_feeding:
            states = tuple(self.scoreboard.state(slot) for slot in self._workers)
            if states != self._states:
                self._states = states
                self.events += 1
        self._timers(now)
        for event in self.spawner.take_ready():  # a direct fork is done at once
            self._on_spawner_event(event)
        if self._closing:
            self._progress_shutdown(now)

    def _next_wait(self, now: float) -> float:
        wait = self._scaler.next_tick - now
        if self.max_worker_age and not self.self_feeding:
            wait = min(wait, 0.25)  # ages are looked at a few times a second
        if self._deadlines:
            wait = min(wait, self._deadlines[0][0] - now)
        for w in self._workers.values():
            if w.kill_at < math.inf:
                wait = min(wait, w.kill_at - now)
            if w.state == BOOTING and not w.boot_killed:
                wait = min(wait, w.spawned_at + self.boot_timeout - now)
        if self._closing:
            wait = min(wait, 0.05)
        return max(0.0, min(wait, 1.0))

    def _has_room(self) -> bool:
        if self._inline is not None:
            return True
        return any(w.state == READY and not w.inflight and w.budget != 0 for w in self._workers.values())

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
        return all(w.status is not None or (w.pid and spawner.forked_here(w.pid)) for w in self._workers.values())

    def _fork_server_lost(self) -> None:
        restart = not self._closing
        self._log(logging.ERROR, "the fork server died; its workers die with it" + ("; starting a new one" if restart else ""))
        assert isinstance(self.spawner, ForkServer)
        here = self.spawner.detach_here()  # the workers forked here live on
        self._sync_spawner_fds()  # the dead server watches nothing any more
        for w in list(self._workers.values()):
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

    # -- spawning -------------------------------------------------------------------

    def _spawn(self, now: float) -> None:
        if not self._free_slots:
            return
        slot = self._free_slots.pop()
        serial = next(self._serials)
        budget = -1
        if self.max_tasks and not self.self_feeding:
            budget = self.max_tasks + (random.randint(0, self.max_tasks_jitter) if self.max_tasks_jitter else 0)
        w = _Worker(slot, serial, now, budget)
        w.inflight = self.ledger.held(w)  # the ledger's record of what it holds, in order
        w.info = WorkerInfo(slot=slot, name=self.config.name, serial=serial)
        self._workers[slot] = w
        self._scaler.spawned(now)
        self.spawner.spawn(slot, serial)
        self._sync_spawner_fds()

    def _on_spawner_event(self, event: Event) -> None:
        self.events += 1
        if isinstance(event, Spawned):
            w = self._workers.get(event.slot)
            if w is None or w.serial != event.serial:
                event.sock.close()  # we gave up on it; the exit will come
                return
            pid = w.pid = event.pid
            self.last_spawned = pid
            assert w.info is not None
            w.info.pid = pid
            self._by_pid[pid] = w
            w.channel = self.transport.parent_channel(event.sock)
            fd = w.channel.fileno()
            self.ctx.internal_fds.add(fd)
            self._by_fd[fd] = w
            self._sel.register(fd, selectors.EVENT_READ, self._on_channel)
            self._log(logging.INFO, f"forked worker {pid} (slot {event.slot})")
            if self._force:
                self.spawner.signal(pid, signal.SIGKILL)
        elif isinstance(event, SpawnFailed):
            w = self._workers.get(event.slot)
            if w is not None and w.serial == event.serial:
                self._release(w)
                self._boot_failed(event.text)
        else:
            w = self._by_pid.get(event.pid)
            if w is None:
                return
            w.status = event.status
            # Everything it wrote is in its socket now: read it, then judge without waiting
            # for end of stream, which a process it forked (a daemon) may hold off forever.
            reads = 0
            while not w.eof and w.channel is not None and self._read_channel(w) and reads < _DRAIN_READS:
                reads += 1
            self._judge(w)

    # -- worker channels ------------------------------------------------------------

    def _on_channel(self, fd: int, mask: int) -> None:
        w = self._by_fd.get(fd)
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

    def _read_channel(self, w: _Worker) -> int:
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

    def _on_broken_channel(self, w: _Worker, exc: BaseException, sending: bool = False) -> None:
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

    def _on_eof(self, w: _Worker) -> None:
        if w.eof:
            return
        w.eof = True
        fd = w.channel.fileno()
        self._sel.unregister(fd)
        self._by_fd.pop(fd, None)
        self.ctx.internal_fds.discard(fd)
        w.channel.close()
        if w.lost:
            self._judge(w)
        elif w.status is None:
            # the exit status follows; a worker that closed its channel but lives on is killed
            w.kill_at = min(w.kill_at, time.monotonic() + EOF_GRACE)

    def _on_results(self, w: _Worker, frame: Any) -> None:
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

    def _settle(self, w: _Worker, task: Task, ok: bool, value: Any) -> None:
        """``task``, held by ``w``, has its outcome: deliver it, then forget the task
        (in that order: if delivering fails, the task is still on the books)."""
        self._finish(task, ok, value)
        self.ledger.release(task)

    # -- outcomes -------------------------------------------------------------------

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

    # -- dispatch -------------------------------------------------------------------

    def _dispatch(self) -> None:
        queue = self.queue
        if not queue:
            return
        ready = [w for w in self._workers.values() if w.state == READY and w.budget != 0 and not w.eof]
        if not ready:
            return
        if self.one_at_a_time:
            per = 1  # a running task can be cancelled by killing its worker: nothing else is there
        elif self.prefetch:
            per = self.prefetch
        else:
            per = self._auto_prefetch(len(queue))
        ready.sort(key=lambda w: len(w.inflight))
        now = time.monotonic()
        claim = self.sink.claim
        give = self.ledger.give
        frame_bytes = min(self.max_frame or FRAME_BYTES, FRAME_BYTES)
        for w in ready:
            room = per - len(w.inflight)
            if w.budget > 0:
                room = min(room, w.budget)
            if room <= 0:
                continue
            items: list[tuple[int, _frames.Payload]] = []
            size = 1
            given = 0
            while queue and given + len(items) < room:
                task = queue[0]
                payload = task.payload
                psize = (len(payload) if type(payload) is bytes else _frames.payload_size(payload)) + _frames.CALL_OVERHEAD
                if items and size + psize > frame_bytes:
                    # this frame is full: the worker starts on it while the next one travels
                    self._send_calls(w, items)
                    given += len(items)
                    items = []
                    size = 1
                    continue
                queue.popleft()
                if task.done:
                    continue
                if not task.claimed:  # asked once: a re-dispatched task was claimed already
                    try:
                        if not claim(task):
                            continue
                    except BaseException as exc:  # a sink's claim is user code: its error is this task's outcome
                        exc.add_note(f"prefork: the result sink's claim() of task {task.id} failed")
                        self._finish(task, False, exc)
                        continue
                    task.claimed = True
                items.append((task.id, payload))
                size += psize
                give(w, task, now)
            if items:
                self._send_calls(w, items)
            if w.budget == 0 and w.state != RETIRING:  # its last tasks: STOP follows them, the replacement forks now
                self._retire(w, f"max_tasks_per_child reached ({self.max_tasks})", "max-tasks", replace=True)
            if not queue:
                break

    def _send_calls(self, w: _Worker, items: list[tuple[int, _frames.Payload]]) -> None:
        if w.budget > 0:
            w.budget -= len(items)
        try:
            _frames.send_pieces(w.channel, _frames.call_pieces(items))
        except Exception as exc:  # a transport's send refused: that worker's channel is unusable
            self._on_broken_channel(w, exc, sending=True)  # its tasks: sent back (never started) or failed as it dies
            return
        if w.channel.wants_write():
            self._sel.modify(w.channel.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_channel)

    def _auto_prefetch(self, queued: int) -> int:
        """Tasks in flight per worker: 1 for long tasks (fair spread), 2 for medium ones
        (the next is there when one ends), a batch for short ones (fewer frames)."""
        avg = self._avg_task
        alive = sum(1 for w in self._workers.values() if w.state != RETIRING) or 1  # census().alive, cheaper
        if queued <= alive or avg is None or avg >= LONG_TASK:
            return 1
        if avg >= SHORT_TASK:
            return 2
        return min(AUTO_BATCH, max(2, -(-queued // alive)))

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
        here = _Worker(-1, 0, 0.0, -1)  # this process, as the holder of the task it runs
        here.inflight = self.ledger.held(here)
        self.ledger.give(here, task, time.monotonic())
        self._on_results(here, frame)
        self.ledger.forget_holder(here)

    # -- timers: timeouts, boots, kills, scaling --------------------------------------

    def _timers(self, now: float) -> None:
        if self._deadlines:
            for task in list(self.ledger.due(now)):
                self._check_timeout(task, now)
        for w in list(self._workers.values()):
            if self.max_worker_age and w.state == READY and now - w.spawned_at > self.max_worker_age:
                self._retire(w, f"max_worker_age reached ({self.max_worker_age:g} s)", "max-age", replace=True)
            if w.kill_at <= now and w.pid:
                self.spawner.signal(w.pid, signal.SIGKILL)
                w.kill_at = math.inf
            if w.state == BOOTING and now - w.spawned_at > self.boot_timeout and not w.boot_killed:
                w.boot_killed = w.stop_sent = True  # also when it was asked to stop: it cannot hear that yet
                w.boot_error = w.boot_error or f"the worker did not finish booting within boot_timeout = {self.boot_timeout:g} s"
                if w.pid:
                    self.spawner.signal(w.pid, signal.SIGKILL)
                else:  # the fork never came back
                    self._release(w)
                    self._boot_failed(f"no worker was forked within boot_timeout = {self.boot_timeout:g} s")
        if self._scaler.due(now, len(self.queue)):
            self._scale(now)

    def _check_timeout(self, task: Task, now: float) -> None:
        w = self.ledger.holder_of(task)
        if w is None:
            return
        assert isinstance(w, _Worker)
        current, started = self.scoreboard.task(w.slot)
        if current != task.id or w.inflight[0] is not task:
            self.ledger.defer(task, now + (task.timeout or 0.0))  # not started yet
            return
        assert task.timeout is not None
        if started + task.timeout > now:
            self.ledger.defer(task, started + task.timeout)
            return
        # first ask the worker for its stack (faulthandler), then fail the task and kill
        fd = self.scoreboard.words[w.slot * _scoreboard.WORDS + _scoreboard.STACKFD]
        if w.stack_wait == 0.0 and fd >= 0:
            w.stack_wait = now + STACK_WAIT
            self.spawner.signal(w.pid, STACK_SIGNAL, group=False)
        if fd >= 0 and now < w.stack_wait:
            stack = read_stack(w.pid, fd)
            if not stack or len(stack) != w.stack_seen:
                w.stack_seen = len(stack)  # still being written: look again shortly
                self.ledger.defer(task, min(now + 0.02, w.stack_wait))
                return
        stack = read_stack(w.pid, fd)
        task.started_at = started
        self._settle(w, task, False, TaskTimeout(task.timeout, w.pid, stack))
        self._log(logging.WARNING, f"task {task.id} timed out after {task.timeout:g} s; killing worker {w.pid}")
        self._retire(w, "a task timed out", "timeout", kill=True)

    def _is_idle(self, w: _Worker) -> bool:
        if self.self_feeding:
            return self.scoreboard.state(w.slot) == _scoreboard.IDLE
        return not w.inflight

    def _retire(self, w: _Worker, reason: str, cause: str, kill: bool = False, replace: bool = False) -> None:
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
        count = census(self._workers.values(), now, self.scoreboard if self.self_feeding else None)
        step = self._scaler.tick(now, count, len(self.queue))
        for _ in range(step.spawn):
            self._spawn(now)
        if step.retire:
            idle_workers = sorted(
                (w for w in self._workers.values() if w.state == READY and self._is_idle(w)),
                key=lambda w: w.idle_since,
            )
            for w in idle_workers[: step.retire]:
                self._retire(w, "retired by the scaling policy", "scaled-down")

    # -- death ----------------------------------------------------------------------

    def _judge(self, w: _Worker) -> None:
        """The worker's channel is closed and its exit status known: settle its tasks."""
        if self._workers.get(w.slot) is not w:
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
        expected = w.state == RETIRING or self._closing
        for lost in settlement.lost:
            detail = lost.detail or (w.lost_reason if lost.started else "")
            self._finish(lost.task, False, WorkerLost(w.pid, status, started=lost.started, detail=detail))
        booted = w.state != BOOTING and not w.boot_error
        if not booted and not expected:
            why = w.boot_error or f"the worker exited during boot ({describe_status(status)})"
            if status is not None and os.WIFEXITED(status) and os.waitstatus_to_exitcode(status) == EXIT_BOOT_FAILED and not w.boot_error:
                why = "the worker's initializer failed"
            self.tally.exits["boot-failure"] += 1
            self._boot_failed(why)
        elif not expected:
            self.tally.exits["crash"] += 1
            self._log(logging.WARNING, f"worker {w.pid} died unexpectedly ({describe_status(status)}); replacing it")
        else:
            self.tally.exits[w.cause or "shutdown"] += 1
        reason = w.reason or ("stopped" if expected else f"died ({describe_status(status)})")
        if expected:
            self._log(logging.INFO, f"worker {w.pid} left: {reason} ({describe_status(status)})")
        try:
            self.hook.prefork_worker_exited(worker=w.info, status=status, reason=reason)
        except BaseException:
            log.exception("a prefork_worker_exited hook failed")
        if not expected:
            self._scaler.soon()  # let the policy replace it now (a retired one was replaced already)

    def _release(self, w: _Worker) -> None:
        self.ledger.forget_holder(w)
        self._workers.pop(w.slot, None)
        if w.pid:
            self._by_pid.pop(w.pid, None)
        if w.channel is not None and not w.eof:
            fd = w.channel.fileno()
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            self._by_fd.pop(fd, None)
            self.ctx.internal_fds.discard(fd)
            w.channel.close()
            w.eof = True
        self.scoreboard.reset(w.slot)
        self._free_slots.append(w.slot)

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

    # -- shutdown -------------------------------------------------------------------

    def _progress_shutdown(self, now: float) -> None:
        if self._force:
            for w in list(self._workers.values()):
                if w.pid and w.kill_at == math.inf:
                    self.spawner.signal(w.pid, signal.SIGKILL)
                    w.kill_at = now + 1.0
                w.state = RETIRING
                w.cause = w.cause or "shutdown"
            for w in list(self._workers.values()):
                if w.state == BOOTING and not w.pid:
                    self._release(w)
        if self.queue and self._broken is None and not self._force:
            return  # still draining
        if self.queue:
            self._fail_everything(self._broken or PoolShutDown("the pool was shut down"))
        if self._tasks and not self._force:
            return  # results still to come
        for w in list(self._workers.values()):
            if w.state == BOOTING and not w.pid:
                self._release(w)  # its spawn is still in the fork server's hands
                continue
            self._retire(w, "pool shut down", "shutdown")
        if isinstance(self.spawner, ForkServer) and not self._force:
            self.spawner.drain()  # it leaves with its last worker, not after the others
        if self._workers:
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
        close = getattr(self.sink, "close", None)  # optional: once, after the last outcome was delivered
        try:
            if close is not None:
                close()
        except BaseException:
            log.exception("result sink %r failed to close", self.sink)
        _live.discard(self)
        self._close_fds()
        self._done_event.set()

    # -- logging and introspection --------------------------------------------------

    def _log(self, level: int, message: str) -> None:
        log.log(level, message)
        try:
            self.hook.prefork_log(level=level, message=message)
        except BaseException:
            log.exception("a prefork_log hook failed")

    @property
    def workers(self) -> list[_Worker]:
        """The worker records now (a copy: safe from any thread)."""
        return list(self._workers.values())

    @property
    def closing(self) -> bool:
        """``shutdown`` was asked for (or the pool broke): no task is taken any more."""
        return self._closing

    @property
    def submitted(self) -> int:
        """Tasks submitted so far."""
        return self._submitted

    def status(self) -> dict[str, Any]:
        """The pool's status as JSON data, from any thread (``prefork._status.snapshot``)."""
        return snapshot(self)

    def resize(self, delta: int) -> ScalingPolicy:
        """``delta`` more (or fewer) workers, as the policy understands it (``resized``):
        ``fixed`` changes ``workers``, ``on-demand`` ``pre_fork``, ``spare`` both spare
        bounds.  Capped by the pool's size; returns the new policy."""
        policy: Any = self.policy
        resized = getattr(policy, "resized", None)  # optional member of ScalingPolicy
        if resized is None:
            raise TypeError(f"scaling policy {getattr(policy, 'name', type(policy).__qualname__)!r} cannot be resized "
                            "(it has no resized(delta) method)")
        if not self.worker_limit:
            raise TypeError("this pool runs its tasks in the caller (its policy allows no worker); it cannot be resized")
        new: ScalingPolicy = resized(delta, self.worker_limit)
        self._scaler.replace_policy(new)
        self._wake()
        return new

    def pids(self) -> list[int]:
        """Pids of the workers alive now."""
        return [w.pid for w in list(self._workers.values()) if w.pid and w.status is None]

    def retire_all(self, reason: str) -> None:
        """Ask every worker to leave once idle; the policy forks their replacements."""
        for w in list(self._workers.values()):
            if w.state != RETIRING:
                self._retire(w, reason, "reload")
        self._scaler.soon()
        self._wake()

    def stats(self) -> dict[str, int]:
        count = census(list(self._workers.values()), time.monotonic(), self.scoreboard if self.self_feeding else None)
        return {
            "workers": count.alive,
            "booting": count.booting,
            "busy": count.busy,
            "idle": count.idle,
            "retiring": count.retiring,
            "queued": len(self.queue),
            "in_flight": len(self._tasks),
            "spawned_total": self._scaler.spawned_total,
        }

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
