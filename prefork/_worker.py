"""The worker: everything that happens in a child after the fork.

``run_worker`` never returns: ``prepare`` resets what the child inherited
(signal handlers, process group, title), runs the init hooks and the
initializer and says READY; then the worker either loops on CALLS frames until
STOP or end of stream (its task budget is the supervisor's business), or runs a
self-feeding body (the MPM profile) that reports busy/idle through the
scoreboard.  It always leaves through ``os._exit`` with a named code.  The call
loop builds its RESULTS frames in shared memory (``prefork._result_buffer``).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import ctypes
import faulthandler
import gc
import logging
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Final, NoReturn

import attrs

from prefork import _frames, _logging, _scoreboard
from prefork._call import Caller, resolve_method
from prefork._memory import boot_rss, rss_bytes
from prefork._proctitle import TaskTitle, set_title
from prefork._result_buffer import ResultBuffer
from prefork._takeback import Claim
from prefork._task import WorkerInfo
from prefork.strategies.resolver import MethodResolver
from prefork.strategies.serializer import Serializer
from prefork.strategies.transport import ChildChannel, Transport

EXIT_OK: Final = 0
EXIT_BOOT_FAILED: Final = 3  #: init hook or initializer raised: the pool counts it
EXIT_INTERNAL: Final = 4  #: prefork itself failed in the worker
EXIT_FINALIZER_FAILED: Final = 5  #: the finalizer raised (logged, with its traceback, to prefork.worker)
EXIT_BODY_FAILED: Final = 6  #: a self-feeding body raised (logged, with its traceback, to prefork.worker)

_PR_SET_PDEATHSIG: Final = 1
_FLUSH_AGE: Final = 0.0005  #: buffered results older than this are sent before the next task
_FLUSH_SLOW: Final = 0.0001  #: a task slower than this sends its result at once

log = logging.getLogger("prefork.worker")


@attrs.define
class WorkerContext:
    """What a worker needs, built in the supervisor before any fork and inherited."""

    name: str
    title: str
    serializer: Serializer
    resolver: MethodResolver
    transport: Transport
    hook: Any
    scoreboard: _scoreboard.Scoreboard
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    finalizer: Callable[[], Any] | None = None
    #: self-feeding workers (MPM): recycle after this many requests (+ 0..jitter), or this much growth
    max_tasks: int = 0
    max_tasks_jitter: int = 0
    max_rss_mb: float = 0.0
    #: a self-feeding body, ``body(*body_args)``, run instead of the call loop
    body: Callable[..., Any] | None = None
    body_args: tuple[Any, ...] = ()
    #: signal handlers installed in each worker: signal number -> callable, SIG_DFL or SIG_IGN
    child_signals: dict[int, Any] = attrs.field(factory=dict)
    #: fork in the supervisor and return into the caller's code in the child (MPM kid_new)
    return_in_child: bool = False
    #: file descriptors of the supervisor's own plumbing, closed in every child
    internal_fds: set[int] = attrs.field(factory=set)


class WorkerHandle:
    """What code running in a worker can ask of prefork: ``prefork.current_worker()``.

    ``yell`` works in every worker.  ``busy``, ``idle`` and ``exit`` are for
    self-feeding workers (the MPM profile), whose body finds its own work.
    """

    __slots__ = (
        "_base", "_budget", "_channel", "_ctx", "_kept", "_resolved", "_rss_base", "_words", "channel_lost", "info",
        "leaving", "requests",
    )

    def __init__(self, ctx: WorkerContext, info: WorkerInfo, channel: ChildChannel) -> None:
        self.info = info
        self._ctx = ctx
        self._channel = channel
        self._words = ctx.scoreboard.words
        self._base = info.slot * _scoreboard.WORDS
        self.requests = 0  #: requests ended so far (idle() calls, less those that end a keep-alive wait)
        self._kept = False  #: idle(keepalive=True) came last: waiting on a kept-alive connection
        jitter = random.randint(0, ctx.max_tasks_jitter) if ctx.max_tasks_jitter else 0
        self._budget = ctx.max_tasks + jitter if ctx.max_tasks else 0
        self._rss_base = 0
        #: set when the worker should leave at its next idle(), e.g. by a SIGTERM while busy
        self.leaving = ""
        #: a send on the channel to the supervisor failed: the supervisor closed it (or is gone)
        self.channel_lost = False
        self._resolved: dict[str, Callable[..., Any]] = {}

    def resolve(self, method: Any) -> Callable[..., Any]:
        """What the pool calls for ``method`` in this worker: ``method`` itself when
        callable, else what the pool's resolver finds for the name
        (:class:`prefork.MethodNotFound` if nothing).  For code that calls a task's
        method on the pool's behalf, such as a plugin wrapping it."""
        return resolve_method(self._ctx.resolver, method, self._resolved)

    def yell(self, data: Any) -> None:
        """Send ``data`` to the supervisor now; its ``prefork_child_data`` hooks receive it.

        Each message arrives whole, whatever its size, and never interleaves with
        another worker's.  Raises ``TypeError`` when the serializer refuses ``data``.
        """
        frame = _frames.encode_data(self._dump(data), None)
        try:
            self._channel.send(frame)
        except (BrokenPipeError, ConnectionResetError):
            self.channel_lost = True  # the body's end is then no failure of its own
            raise

    def _dump(self, data: Any) -> bytes:
        ser = self._ctx.serializer
        try:
            return ser.dumps(data)
        except Exception as exc:
            raise TypeError(f"yell: {type(data).__name__} cannot be serialized with {ser.name!r}: {exc}") from exc

    def busy(self) -> None:
        """Tell the supervisor this worker is busy (a memory write, no system call):
        a request begins, a kept-alive connection's next one included."""
        self._kept = False
        self._words[self._base + _scoreboard.STATE] = _scoreboard.BUSY
        self._words[self._base + _scoreboard.SINCE] = time.monotonic_ns()

    def idle(self, keepalive: bool = False) -> None:
        """A request ended: tell the supervisor this worker is idle again, count the
        request, and leave here when its request budget, its memory limit or a
        pending stop says so.

        With ``keepalive=True`` the worker waits on the same connection for that
        client's next request: the scoreboard says ``keepalive``, not idle.  Such a
        worker accepts no other connection, so it counts as busy for the scaling
        policy (no spare), is never retired as idle, and is not timed by
        ``mpm.request_timeout``.  ``busy()`` ends the wait when the next request
        comes; ``idle()`` ends it when the connection closes: that call counts no
        request (this one did) and leaves only on a pending stop."""
        if self._kept and not keepalive:
            self._end_keepalive()
            if self.leaving:
                self.exit(0, reason=self.leaving)
            return
        self._kept = keepalive
        self._words[self._base + _scoreboard.STATE] = _scoreboard.KEEPALIVE if keepalive else _scoreboard.IDLE
        self._words[self._base + _scoreboard.SINCE] = time.monotonic_ns()
        self.requests += 1
        if not self.leaving and self._budget and self.requests >= self._budget:
            self.leaving = f"max_tasks_per_child reached ({self.requests} requests)"
        if not self.leaving and self._ctx.max_rss_mb and self._rss_base:
            rss = rss_bytes()
            self._rss_base = min(self._rss_base, rss)  # inherited memory it freed hides no growth
            grown = (rss - self._rss_base) / 2**20
            if grown > self._ctx.max_rss_mb:
                self.leaving = f"memory grew by {grown:.0f} MiB since boot (max_rss_mb = {self._ctx.max_rss_mb:g})"
        if self.leaving:
            self.exit(0, reason=self.leaving)

    def _end_keepalive(self) -> None:
        """The kept-alive connection ended: idle again, counting no request and never
        leaving (for code that must not raise here; ``idle()`` leaves on a pending stop).
        Nothing to do unless ``idle(keepalive=True)`` came last."""
        if self._kept:
            self._kept = False
            self._words[self._base + _scoreboard.STATE] = _scoreboard.IDLE
            self._words[self._base + _scoreboard.SINCE] = time.monotonic_ns()

    def exit(self, code: int = 0, data: Any = None, reason: str = "exit() called") -> NoReturn:
        """Leave now: send ``data`` (if any) with the exit code, announce the exit,
        run the finalizer and exit hooks, and exit with ``code`` (0-255).  In a
        body this raises ``SystemExit`` (the body's ``finally`` blocks run); in a
        child of ``kid_new`` the process ends here, whatever the code around."""
        try:
            if data is not None:
                self._channel.send(_frames.encode_data(self._dump(data), code & 0xFF))
            self._channel.send(bytes([_frames.LEAVING]) + reason.encode())
        except OSError:
            pass  # the supervisor is gone
        self._words[self._base + _scoreboard.STATE] = _scoreboard.EXITING
        if self._ctx.return_in_child:
            # the caller's own code runs here (kid_new): nothing in it may catch this exit
            leave(self._ctx, self.info, reason)
            _flush_std()
            os._exit(code & 0xFF)
        raise SystemExit(code & 0xFF)  # a body: its finally blocks run, then _run_body leaves


#: the signal that makes a worker write its stack (all threads) for the supervisor
STACK_SIGNAL: Final = signal.SIGUSR2


def _arm_stack_dump(ctx: WorkerContext, info: WorkerInfo) -> None:
    """faulthandler writes every thread's stack to a memory file on STACK_SIGNAL;
    the supervisor reads it through /proc before it kills a stuck worker."""
    try:
        fd = os.memfd_create(f"prefork-stack-{info.pid}", os.MFD_CLOEXEC)
        faulthandler.register(STACK_SIGNAL, file=fd, all_threads=True)
    except (OSError, AttributeError, RuntimeError, ValueError):
        return
    ctx.scoreboard.words[info.slot * _scoreboard.WORDS + _scoreboard.STACKFD] = fd


def read_stack(pid: int, fd: int) -> str:
    """The stack a worker dumped (see _arm_stack_dump), or "" if there is none."""
    if fd < 0:
        return ""
    try:
        with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return ""


class ForkedChild(BaseException):
    """Raised in a new worker forked with ``return_in_child``: it unwinds the
    supervisor's frames so the caller's own code continues in the child."""

    def __init__(self, handle: WorkerHandle) -> None:
        super().__init__("a forked child returning into the caller's code")
        self.handle = handle


_current: WorkerHandle | None = None


def current_worker() -> WorkerHandle | None:
    """The worker this code runs in, or ``None`` outside a worker."""
    return _current


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()  # looked up once in the parent, not in every new worker


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when the forking thread's process dies (Linux)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


_RESETTABLE: Final = tuple(
    int(sig) for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)
)


def reset_signals() -> None:
    """Drop the handlers inherited from the parent; the supervisor decides about SIGINT.

    ``_signal`` is called directly: ``signal``'s enum conversions made this loop the
    slowest step of a worker's boot (0.2 ms for 64 signals)."""
    getsignal, setsignal, dfl = _signal.getsignal, _signal.signal, _signal.SIG_DFL
    for sig in _RESETTABLE:
        try:
            handler = getsignal(sig)
        except (ValueError, OSError):
            continue
        if handler is None or callable(handler):  # Python's or a C library's handler
            try:
                setsignal(sig, dfl)
            except (OSError, ValueError, RuntimeError):
                pass
    setsignal(signal.SIGINT, _signal.SIG_IGN)
    setsignal(signal.SIGTERM, dfl)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def close_fds(fds: set[int], keep: int) -> None:
    for fd in fds:
        if fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def run_worker(ctx: WorkerContext, info: WorkerInfo, sock: Any, parent_pid: int) -> NoReturn:
    code = EXIT_INTERNAL
    try:
        code = _run(ctx, info, sock, parent_pid)
    except BaseException:
        try:
            log.exception("worker %d: prefork itself failed in the worker; it exits with code %d", os.getpid(), code)
        except BaseException:
            pass
    finally:
        _flush_std()
        os._exit(code)


def prepare(ctx: WorkerContext, info: WorkerInfo, sock: Any, parent_pid: int) -> WorkerHandle | int:
    """Everything between the fork and READY; an int is an exit code (boot failed)."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:
        return EXIT_OK  # the parent died while we were being forked
    # What the worker inherited stays shared with its parent only while nobody writes to it;
    # the cyclic GC writes to every object it traverses.  Move the inherited objects out of
    # its sight (an O(1) splice of its lists), so a collection here copies none of them.
    gc.freeze()
    close_fds(ctx.internal_fds, sock.fileno())
    reset_signals()  # ends by unblocking every signal: one sent during the fork arrives now
    for signum, handler in ctx.child_signals.items():
        signal.signal(signum, handler)
    try:
        os.setpgid(0, 0)  # our own group: a kill reaches what the task forked too
    except OSError:
        pass
    info.pid = os.getpid()
    _logging.set_role("worker")
    set_title(ctx.title)
    _arm_stack_dump(ctx, info)
    channel = ctx.transport.child_channel(sock)
    global _current
    handle = _current = WorkerHandle(ctx, info, channel)
    try:
        ctx.hook.prefork_worker_init(worker=info)
        if ctx.initializer is not None:
            ctx.initializer(*ctx.initargs)
    except BaseException:
        try:
            channel.send(bytes([_frames.BOOTFAIL]) + traceback.format_exc().encode("utf-8", "replace"))
        except OSError:
            pass
        return EXIT_BOOT_FAILED
    ctx.scoreboard.set_state(info.slot, _scoreboard.IDLE)
    try:
        channel.send(_frames.READY_FRAME)
    except (BrokenPipeError, ConnectionResetError):
        # The supervisor gave up on us while we booted (a shut-down began while our spawn
        # was still in the fork server's hands).  The initializer ran: so does the finalizer.
        ctx.scoreboard.set_state(info.slot, _scoreboard.EXITING)
        return leave(ctx, info, "the supervisor closed the channel during boot")
    if ctx.max_rss_mb:
        handle._rss_base = boot_rss()
    return handle


def _run(ctx: WorkerContext, info: WorkerInfo, sock: Any, parent_pid: int) -> int:
    handle = prepare(ctx, info, sock, parent_pid)
    if isinstance(handle, int):
        return handle
    if ctx.body is not None:
        return _run_body(ctx, info, handle)
    try:
        reason = _call_loop(ctx, info, handle._channel, handle._rss_base)
    except (BrokenPipeError, ConnectionResetError):
        reason = "the supervisor closed the channel"
    ctx.scoreboard.set_state(info.slot, _scoreboard.EXITING)
    return leave(ctx, info, reason)


def _run_body(ctx: WorkerContext, info: WorkerInfo, handle: WorkerHandle) -> int:
    """A self-feeding worker: its body finds its own work; returning ends the worker."""
    assert ctx.body is not None
    code = EXIT_OK
    reason = "its body returned"
    try:
        ctx.body(*ctx.body_args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        reason = handle.leaving or "exit() called"
    except BaseException as exc:
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)) and handle.channel_lost:
            reason = "the supervisor closed the channel"  # a yell() found it closed
        else:  # a client's reset or broken pipe is the body's failure like any other
            log.exception("the body of worker %d failed; it exits with code %d", info.pid, EXIT_BODY_FAILED)
            return EXIT_BODY_FAILED
    ctx.scoreboard.set_state(info.slot, _scoreboard.EXITING)
    return leave(ctx, info, reason) or code


def leave(ctx: WorkerContext, info: WorkerInfo, reason: str) -> int:
    """A worker leaving on its own: the finalizer, then the exit hooks; never raises."""
    code = EXIT_OK
    if ctx.finalizer is not None:
        try:
            ctx.finalizer()
        except BaseException:
            log.exception("the finalizer of worker %d failed; it exits with code %d", info.pid, EXIT_FINALIZER_FAILED)
            code = EXIT_FINALIZER_FAILED
    try:
        ctx.hook.prefork_worker_exit(worker=info, reason=reason)
    except BaseException:
        log.exception("a prefork_worker_exit hook failed in worker %d (leaving: %s)", info.pid, reason)
    return code


def _call_loop(ctx: WorkerContext, info: WorkerInfo, channel: ChildChannel, rss_base: int = 0) -> str:
    caller = Caller(ctx.serializer, ctx.resolver, ctx.hook, info)
    title = TaskTitle(ctx.title)
    caller.on_call = title.busy
    rss_limit = ctx.max_rss_mb * 2**20
    # rss_base: prepare()'s boot_rss() (the free heap handed back first); rss read after each batch
    asked = False
    words = ctx.scoreboard.words
    base = info.slot * _scoreboard.WORDS
    monotonic = time.monotonic
    monotonic_ns = time.monotonic_ns
    recv = channel.recv
    send = channel.send
    results = ResultBuffer(ctx.scoreboard, info.slot, channel)
    add = results.add
    flush = results.flush
    claim = Claim(ctx.scoreboard, info.slot)
    while True:
        frame = recv()
        if frame is None:
            return "end of stream (the supervisor is gone)"
        kind = frame[0]
        if kind == _frames.STOP:
            return "stopped by the supervisor"
        if kind != _frames.CALLS and kind != _frames.TAKEABLE:
            continue
        takeable = kind == _frames.TAKEABLE  # each call is claimed under the slot's lock first
        calls = _frames.decode_calls(frame)
        del frame  # a large frame's buffer goes once its payload is decoded
        oldest = 0.0
        for tid, payload in calls:
            if results.size and monotonic() - oldest > _FLUSH_AGE:
                flush()
            if takeable and not claim(tid, monotonic_ns()):
                continue  # the supervisor took it back: another worker runs it
            words[base + _scoreboard.TASK] = tid
            now_ns = monotonic_ns()
            words[base + _scoreboard.STARTED] = now_ns
            words[base + _scoreboard.STATE] = _scoreboard.BUSY
            if not add(caller.call(tid, payload)):
                oldest = now_ns / 1e9  # the first result of this batch
            words[base + _scoreboard.DONE] += 1
            if results.size and monotonic() - now_ns / 1e9 > _FLUSH_SLOW:
                flush()
        del calls
        words[base + _scoreboard.STATE] = _scoreboard.IDLE
        words[base + _scoreboard.SINCE] = monotonic_ns()
        if results.size:
            flush()
        title.idle()
        if rss_limit and not asked:
            rss = rss_bytes()
            rss_base = min(rss_base, rss)  # growth counts from the lowest point: freed inherited memory hides none
            grown = rss - rss_base
            if grown > rss_limit:
                asked = True  # the supervisor sends STOP after what we hold: nothing is lost
                send(bytes([_frames.LEAVING]) + f"memory grew by {grown / 2**20:.0f} MiB since boot "
                     f"(max_rss_mb = {ctx.max_rss_mb:g})".encode())
