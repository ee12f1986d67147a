"""The worker: everything that happens in a child after the fork.

``run_worker`` never returns: it resets what the child inherited (signal
handlers, process group, title), runs the init hooks and the initializer, says
READY, then loops on CALLS frames until STOP, end of stream, or its task budget.
It always leaves through ``os._exit`` with a named code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Final, NoReturn

import attrs

from prefork import _frames, _scoreboard
from prefork._call import Caller
from prefork._proctitle import set_title
from prefork._task import WorkerInfo
from prefork.strategies.resolver import MethodResolver
from prefork.strategies.serializer import Serializer
from prefork.strategies.transport import ChildChannel, Transport

EXIT_OK: Final = 0
EXIT_BOOT_FAILED: Final = 3  #: init hook or initializer raised: the pool counts it
EXIT_INTERNAL: Final = 4  #: prefork itself failed in the worker
EXIT_FINALIZER_FAILED: Final = 5  #: the finalizer raised (its traceback is on stderr)

_PR_SET_PDEATHSIG: Final = 1
_FLUSH_AGE: Final = 0.0005  #: buffered results older than this are sent before the next task
_FLUSH_SLOW: Final = 0.0001  #: a task slower than this sends its result at once


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
    max_tasks: int = 0
    #: file descriptors of the supervisor's own plumbing, closed in every child
    internal_fds: set[int] = attrs.field(factory=set)


class WorkerHandle:
    """What code running in a worker can ask of prefork: ``prefork.current_worker()``."""

    __slots__ = ("_channel", "_serializer", "info")

    def __init__(self, info: WorkerInfo, channel: ChildChannel, serializer: Serializer) -> None:
        self.info = info
        self._channel = channel
        self._serializer = serializer

    def yell(self, data: Any) -> None:
        """Send ``data`` to the supervisor now; its ``prefork_child_data`` hooks receive it.

        Each message arrives whole, whatever its size, and never interleaves with
        another worker's.  Raises ``TypeError`` when the serializer refuses ``data``.
        """
        try:
            payload = self._serializer.dumps(data)
        except Exception as exc:
            raise TypeError(f"yell: {type(data).__name__} cannot be serialized with {self._serializer.name!r}: {exc}") from exc
        self._channel.send(_frames.encode_data(payload, None))


_current: WorkerHandle | None = None


def current_worker() -> WorkerHandle | None:
    """The worker this code runs in, or ``None`` outside a worker."""
    return _current


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when the forking thread's process dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reset_signals() -> None:
    """Drop the handlers inherited from the parent; the supervisor decides about SIGINT."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if callable(handler) or handler is None:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError, RuntimeError):
                pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        _flush_std()
        os._exit(code)


def _run(ctx: WorkerContext, info: WorkerInfo, sock: Any, parent_pid: int) -> int:
    set_parent_death_signal()
    if os.getppid() != parent_pid:
        return EXIT_OK  # the parent died while we were being forked
    close_fds(ctx.internal_fds, sock.fileno())
    reset_signals()
    try:
        os.setpgid(0, 0)  # our own group: a kill reaches what the task forked too
    except OSError:
        pass
    info.pid = os.getpid()
    set_title(ctx.title)
    channel = ctx.transport.child_channel(sock)
    global _current
    _current = WorkerHandle(info, channel, ctx.serializer)
    board = ctx.scoreboard
    slot = info.slot
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
    board.set_state(slot, _scoreboard.IDLE)
    try:
        channel.send(_frames.READY_FRAME)
        reason = _call_loop(ctx, info, channel)
    except (BrokenPipeError, ConnectionResetError):
        reason = "the supervisor closed the channel"
    board.set_state(slot, _scoreboard.EXITING)
    return leave(ctx, info, reason)


def leave(ctx: WorkerContext, info: WorkerInfo, reason: str) -> int:
    """A worker leaving on its own: the finalizer, then the exit hooks; never raises."""
    code = EXIT_OK
    if ctx.finalizer is not None:
        try:
            ctx.finalizer()
        except BaseException:
            print(f"prefork: the finalizer of worker {info.pid} failed:", file=sys.stderr)
            traceback.print_exc()
            code = EXIT_FINALIZER_FAILED
    try:
        ctx.hook.prefork_worker_exit(worker=info, reason=reason)
    except BaseException:
        traceback.print_exc()
    return code


def _call_loop(ctx: WorkerContext, info: WorkerInfo, channel: ChildChannel) -> str:
    caller = Caller(ctx.serializer, ctx.resolver, ctx.hook, info)
    words = ctx.scoreboard.words
    base = info.slot * _scoreboard.WORDS
    budget = ctx.max_tasks or -1
    monotonic = time.monotonic
    monotonic_ns = time.monotonic_ns
    recv = channel.recv
    send = channel.send
    head = _frames.RESULTS_HEAD
    while True:
        frame = recv()
        if frame is None:
            return "end of stream (the supervisor is gone)"
        kind = frame[0]
        if kind == _frames.STOP:
            return "stopped by the supervisor"
        if kind != _frames.CALLS:
            continue
        calls = _frames.decode_calls(frame)
        out: list[bytes] = []
        oldest = 0.0
        for tid, payload in calls:
            if out and monotonic() - oldest > _FLUSH_AGE:
                send(head + b"".join(out))
                out = []
            words[base + _scoreboard.TASK] = tid
            now_ns = monotonic_ns()
            words[base + _scoreboard.STARTED] = now_ns
            words[base + _scoreboard.STATE] = _scoreboard.BUSY
            record = caller.call(tid, payload)
            words[base + _scoreboard.DONE] += 1
            if not out:
                oldest = now_ns / 1e9
            out.append(record)
            if monotonic() - now_ns / 1e9 > _FLUSH_SLOW:
                send(head + b"".join(out))
                out = []
            budget -= 1
            if budget == 0:
                break
        words[base + _scoreboard.STATE] = _scoreboard.IDLE
        words[base + _scoreboard.SINCE] = monotonic_ns()
        if out:
            send(head + b"".join(out))
        if budget == 0:
            send(bytes([_frames.LEAVING]) + b"max_tasks_per_child reached")
            return "max_tasks_per_child reached"
