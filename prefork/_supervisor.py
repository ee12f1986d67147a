"""The supervisor: one loop that owns the workers and the queue (docs/design.md has the map).

    submit() -> queue -> dispatch: CALLS frames to ready workers -> call loop (worker)
    sink.deliver(task, ok, value), once per task <- RESULTS frames <--------'
    spawner (fork server or direct) -> Spawned / SpawnFailed / Exited events
    scoreboard (shared memory): which task a dead worker had started; idle/busy
    scaling policy: decide(PoolStats) -> spawn n / retire n / next tick

The loop waits in one ``select`` on the wakeup pipe, the spawner's descriptors
and every worker channel.  A worker is judged once its exit status is known and
its channel was read to the end (or as far as a bounded drain goes: a daemon it
left behind may hold the channel open); each task it held then fails (it had
started: WorkerLost) or goes back to the front of the queue (it never did).

Layers: this module is the public API (construction, ``submit``, ``shutdown``,
``step``, run-time control); ``prefork._loop`` spawning, timers, scaling and
shutdown; ``prefork._worker_io`` channels, outcomes and deaths.  Decisions are
made by parts with no I/O: ``_ledger`` (tasks), ``_workers`` (workers),
``_dispatch`` (which task goes where), ``_scaler`` (when to scale).
"""
from __future__ import annotations

import itertools
import math
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any, Final

from prefork import _frames, _scoreboard
from prefork._call import Caller, buffer_loads, dump_parts
from prefork._dispatch import encode_call
from prefork._ledger import Ledger
from prefork._lifetime import KILL_WAIT, live_pools
from prefork._loop import PoolLoop
from prefork._operate import Endpoints
from prefork._scaler import Scaler, evolve_policy
from prefork._spawn import DirectSpawner, ForkServer
from prefork._status import Tally, snapshot
from prefork._task import Task, WorkerInfo
from prefork._threads import join_thread
from prefork._worker import WorkerContext
from prefork._worker_io import log
from prefork._workers import Worker, WorkerTable
from prefork.config._imports import pool_callable
from prefork.errors import ConfigError, PoolBroken, PoolShutDown, PreforkError
from prefork.plugins import pool_plugin_manager
from prefork.strategies import optional
from prefork.strategies.registry import KINDS
from prefork.strategies.resolver import MethodResolver
from prefork.strategies.scaling import ScalingPolicy
from prefork.strategies.serializer import Serializer
from prefork.strategies.sink import ResultSink
from prefork.strategies.transport import Transport

WORKER_LIMIT: Final = 64  #: a pool may grow to this many workers at run time (or its policy's maximum, if more)
_NO_KWARGS: Final[dict[str, Any]] = {}  #: shared by calls without keyword arguments; never mutated

__all__ = ["KILL_WAIT", "WORKER_LIMIT", "Supervisor"]


class Supervisor(PoolLoop):
    """Owns a pool of workers built from a :class:`prefork.config.Config`.

    ``sink`` and ``resolver`` default to the config's strategies; ``initializer``
    overrides the config's.  With ``body`` the workers feed themselves (the MPM
    profile): each runs ``body(*body_args)`` and reports busy/idle through the
    scoreboard; ``return_in_child`` (direct forks only) makes a new worker return
    into the caller's code instead (``ForkedChild`` is raised in the child).  ``threaded=False`` leaves the loop to the caller (``step``).
    ``plugins`` are hook implementations for this pool alone (a facade's own).  ``waiting()``
    counts work waiting outside the queue (``prefork serve``: its listen queue), added to
    what the scaling policy sees as ``queued``.  ``private_fds`` are the caller's: workers close them.
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
        waiting: Callable[[], int] | None = None,
        private_fds: tuple[int, ...] = (),
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
        initializer = initializer or pool_callable(config, "initializer")
        initargs = tuple(pool.initargs) if initargs is None else initargs
        finalizer = pool_callable(config, "finalizer")
        self.max_workers = self._scaler.policy.max_workers()
        #: most workers at once, whatever the policy becomes at run time (the scoreboard's size)
        self.worker_limit = max(self.max_workers, WORKER_LIMIT) if self.max_workers else 0
        self._scaler.max_workers = self.worker_limit
        for kind, strategy in zip(KINDS, (self.policy, self.transport, self.serializer, self.resolver, self.sink), strict=True):
            optional.check(kind, strategy, repr(getattr(strategy, "name", type(strategy).__qualname__)))
        self.max_frame = optional.max_frame(self.transport)
        self._call_limit = _frames.MAX_PAYLOAD
        if self.max_frame:
            # a CALLS frame with one call: its kind byte, the call's header, the payload
            self._call_limit = min(self._call_limit, self.max_frame - 1 - _frames.CALL_OVERHEAD)
        self.max_tasks = pool.max_tasks_per_child
        self.max_tasks_jitter = pool.max_tasks_jitter
        self.graceful_timeout = pool.graceful_timeout
        self.waiting = waiting  #: work waiting outside the queue (connections in a listen queue), for the policy
        self.upgrader: Callable[[], str] | None = None  #: prefork serve's upgrade, for `prefork ctl NAME upgrade`
        #: harakiri: a self-feeding worker busy longer than this is killed (0: never)
        self.busy_timeout = config.mpm.request_timeout if body is not None or return_in_child else 0.0
        if config.mpm.request_timeout and not self.busy_timeout:  # never silently ignored
            raise ConfigError(f"mpm.request_timeout = {config.mpm.request_timeout:g}: only a pool whose workers feed "
                              "themselves (MPM, prefork serve) has requests; a task pool limits tasks with pool.task_timeout")
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
        self.tally = Tally(timing=bool(config.control.metrics_port))  #: totals for status and metrics
        self._submitted = 0
        self.queue = self.ledger.queue  # the same objects, for the hot paths
        self._tasks = self.ledger.in_flight
        self.table = WorkerTable(self.scoreboard.slots)  #: the workers by slot, pid and channel
        self._ids = itertools.count(1)
        self._serials = itertools.count(1)
        self._deadlines = self.ledger.deadlines
        self._avg_task: float | None = None  # moving average of task run time (s)
        self._take_retry = 0.0  # a take-back met a held slot lock: look again this soon (s)
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
        self.ctx.internal_fds.update((self._wake_r, self._wake_w, self._sel.fileno(), *private_fds))
        if pool.fork_from == "direct" or return_in_child:
            self.spawner: ForkServer | DirectSpawner = DirectSpawner(self.ctx)
        else:
            self.spawner = ForkServer(self.ctx)
            # a graceful stop waits this long for a worker still booting to finish and leave
            self.spawner.stop_grace = self.boot_timeout
        self._spawner_fds: set[int] = set()
        self._started = False
        self.endpoints = Endpoints(self)  #: [control]: control socket, metrics, status page
        self._reloads: deque[tuple[str, bool]] = deque()  # retire_all() asked it, for the loop to do
        self._chain, self._chain_reason, self._chain_current, self._chain_target, self._chain_ticks = deque(), "", 0, 0, -1
        self._cancels: deque[Task] = deque()  # running tasks to stop (KillableFuture.cancel)
        self.one_at_a_time = optional.cancels_running(self.sink)
        if self.one_at_a_time:
            self.sink.killer = self.cancel_running

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self.endpoints.claim()  # a pool name in use fails here, before any fork
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
            self.endpoints.start()
        except BaseException:  # a strategy or hook raised while starting: leave nothing behind
            self._teardown()
            raise
        live_pools.add(self)
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
                    join_thread(self._thread)  # gone from the kernel too: the next pool may fork at once
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
        unsent = encode_call(task, self._dump_parts, self.serializer, self._call_limit, self.max_frame)
        if unsent is not None:
            self._finish(task, False, unsent)
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
            if self.queue or self._take_retry:
                return False  # no room: the loop dispatches when a worker frees up
            return not self._deadlines or self._deadlines[0][0] >= deadline  # else its sleep is too long
        finally:
            self._step_lock.release()

    def cancel_running(self, task: Task) -> None:
        """Stop ``task`` if it is running (any thread): its worker is killed and replaced."""
        self._cancels.append(task)
        self._wake()

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

    def update_policy(self, **changes: Any) -> ScalingPolicy:
        """Change the scaling policy's options while the pool runs (``min_spare=2``...),
        checked by the policy's own validators; returns the new policy.  Works for any
        attrs policy; another policy may offer ``evolve(**changes)``."""
        new = evolve_policy(self.policy, changes)
        if new.max_workers() > self.worker_limit:
            raise ValueError(f"the pool was made for at most {self.worker_limit} workers (its scoreboard's size); "
                             f"the changed policy wants {new.max_workers()}")
        self._scaler.replace_policy(new)
        self._wake()
        return new

    def resize(self, delta: int) -> ScalingPolicy:
        """``delta`` more (or fewer) workers, as the policy understands it (``resized``):
        ``fixed`` changes ``workers``, ``on-demand`` ``pre_fork``, ``spare`` both spare
        bounds.  Capped by the pool's size; returns the new policy."""
        policy: Any = self.policy
        resized = optional.resized(policy)
        if resized is None:
            raise TypeError(f"scaling policy {getattr(policy, 'name', type(policy).__qualname__)!r} cannot be resized "
                            "(it has no resized(delta) method)")
        if not self.worker_limit:
            raise TypeError("this pool runs its tasks in the caller (its policy allows no worker); it cannot be resized")
        new: ScalingPolicy = resized(delta, self.worker_limit)
        self._scaler.replace_policy(new)
        self._wake()
        return new

    @property
    def wakeup_fd(self) -> int:
        """The write end of the loop's wake pipe (non-blocking; -1 once stopped): a byte
        written there makes ``step`` return.  For ``signal.set_wakeup_fd`` on a
        ``os.dup`` of it, so that a signal wakes the loop without Python code."""
        return self._wake_w

    def step(self, timeout: float | None = None) -> None:
        """One pass: wait for events (at most ``timeout`` or until the next timer), handle them."""
        now = time.monotonic()
        wait = self._next_wait(now)
        if timeout is not None:
            wait = min(wait, timeout)
        self._sleeping = True
        if self.queue and (self._inline is not None or self.table.has_room()):
            wait = 0.0
        events = self._sel.select(max(0.0, wait))
        self._sleeping = False
        with self._step_lock:  # a submitting thread may be dispatching (_dispatch_here)
            self._step_body(events)

    @property
    def workers(self) -> list[Worker]:
        """The worker records now (a copy: safe from any thread)."""
        return self.table.all()

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

    def pids(self) -> list[int]:
        """Pids of the workers alive now."""
        return self.table.pids()

    def retire_all(self, reason: str, chain: bool = False) -> None:
        """Ask every worker to leave once idle; the policy forks their replacements.  ``chain``:
        one at a time, the next once the last has left and no worker is booting.  Safe from
        any thread (and a signal handler): the loop does it at its next pass."""
        self._reloads.append((reason, chain))  # atomic: never waits for a lock a signal handler may have interrupted
        self._wake()

    def reloading(self) -> bool:
        """A reload was asked for (``retire_all``) and not yet begun, or a chain reload is under way."""
        return bool(self._reloads or self._chain or self._chain_current)

    def stats(self) -> dict[str, int]:
        """Workers by state, queued and in-flight tasks, forks so far (``status()`` says more)."""
        c = self.table.census(time.monotonic(), self.scoreboard if self.self_feeding else None)
        return {"workers": c.alive, "booting": c.booting, "busy": c.busy, "idle": c.idle, "retiring": c.retiring,
                "queued": len(self.queue), "in_flight": len(self._tasks), "spawned_total": self._scaler.spawned_total}
