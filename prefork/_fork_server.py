"""The fork server's own process: a single-threaded loop that forks workers when
the supervisor asks, hands it each worker's socket, reports every exit, and
takes the pool's processes down with it when the caller dies (see
``prefork._spawn`` for the supervisor's side and the reasons).

Messages on its control socket are pickled tuples between two processes of the
same pool (the socket is a private socketpair, never reachable from outside):
``("spawn", slot, serial)``, ``("signal", pid, sig, group)``, ``("here", pids)``,
``("gone", *pids)``, ``("drain",)``, ``("stop", graceful, grace)`` in; ``("spawned",
slot, serial, pid)`` with the worker's socket, ``("failed", slot, serial, text)``,
``("exited", pid, status)`` out.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import pickle
import selectors
import signal
import socket
import time
from typing import Any, Final, NoReturn

from prefork._fork import STOP_SIGNALS, fork_worker, reap_worker, signal_group
from prefork._logging import set_role
from prefork._proctitle import set_title
from prefork._worker import WorkerContext, close_fds, reset_signals

log = logging.getLogger("prefork.spawn")

#: seconds the fork server waits, on a graceful stop, for workers the supervisor gave up on
#: while they booted (they finish their initializer, then run their finalizer) before SIGKILL;
#: ``ForkServer.stop_grace`` (the default of boot_timeout)
STOP_GRACE: Final = 30.0

_PARENT: Final = "parent"  #: selector data of the fork server's pidfd on its parent


def serve(ctx: WorkerContext, sock: socket.socket, parent_pid: int, here: list[int]) -> NoReturn:
    children: dict[int, int] = {}  # pid -> pidfd
    code = 0
    try:
        _serve_loop(ctx, sock, parent_pid, set(here), children)
    except BaseException:
        log.exception("the fork server of %s failed; killing its workers", ctx.name)
        code = 1
        for pid in children:  # they die with us (parent death signal); what their tasks started must too
            signal_group(pid, signal.SIGKILL)
    finally:
        os._exit(code)


def _watch_parent(parent_pid: int) -> int | None:
    """A pidfd on our parent; -1 if it has died already; None if the system has no
    pidfds (then only the end of the control socket tells)."""
    try:
        fd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        return -1
    except OSError:
        return None
    if os.getppid() != parent_pid:  # it died before we opened the pidfd: that may be another process
        os.close(fd)
        return -1
    return fd


def _serve_loop(ctx: WorkerContext, sock: socket.socket, parent_pid: int, here: set[int], children: dict[int, int]) -> None:
    """The fork server's loop.  ``here``: pids of the workers the caller forked itself,
    whose process groups this server kills if the caller dies (the supervisor says
    "gone" once it reaped one; until then its pid cannot be reused)."""
    gc.freeze()  # what the workers inherit through us stays shared (see prepare())
    close_fds(ctx.internal_fds, sock.fileno())
    ctx.internal_fds.clear()
    ctx.internal_fds.add(sock.fileno())
    reset_signals()
    # Signals sent to the caller's process group (Ctrl-C, `timeout`, `kill -- -pgid`) are the
    # supervisor's to act on; this server leaves when the supervisor stops it or its parent dies.
    # They are blocked, not ignored: a worker inherits the mask, and a SIGTERM sent to it before
    # it unblocks (in prepare) stays pending and is delivered then, never lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    set_title(f"{ctx.name} forkserver")
    set_role("fork-server")
    sel = selectors.DefaultSelector()
    ctx.internal_fds.add(sel.fileno())  # every fd of ours is closed in the workers
    sel.register(sock, selectors.EVENT_READ, None)
    # The end of the control socket does not tell that the caller died: a process it forked
    # later (a multiprocessing child, say) holds its end as well.  Its pidfd does.
    parent_fd = _watch_parent(parent_pid)
    if parent_fd is not None and parent_fd >= 0:
        ctx.internal_fds.add(parent_fd)
        sel.register(parent_fd, selectors.EVENT_READ, _PARENT)

    def reap(pid: int) -> int:
        fd = children.pop(pid)
        sel.unregister(fd)
        ctx.internal_fds.discard(fd)
        os.close(fd)
        return reap_worker(pid)

    def send(msg: tuple[Any, ...], fds: list[int] | None = None) -> None:
        if orphaned:
            return  # nobody reads: a process the caller forked may hold the socket, so it may block
        data = pickle.dumps(msg)
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.send(data)

    running = True
    draining = False
    orphaned = False
    kill_at = math.inf  # when the workers still here are killed

    def stop(kill: bool, grace: float = STOP_GRACE) -> None:
        nonlocal running, kill_at
        if running:
            running = False
            sel.unregister(sock)
        # a graceful stop kills nobody at once: a worker the supervisor gave up on during its
        # boot sees the end of its channel and leaves through its finalizer.  A self-feeding
        # worker reads no channel: SIGTERM is how it is asked to leave, as the supervisor asks.
        kill_at = min(kill_at, 0.0 if kill else time.monotonic() + grace)
        if not kill and (ctx.body is not None or ctx.return_in_child):
            for pid in children:
                signal_group(pid, signal.SIGTERM, group=False)

    def orphan() -> None:
        """The caller died: nothing of the pool may outlive it, nor what its tasks started."""
        nonlocal orphaned
        orphaned = True
        for pid in here:  # workers the caller forked: their group id is pinned while one lives
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        here.clear()
        stop(kill=True)

    if parent_fd == -1:
        orphan()
    while running or children:
        if draining and running and not children:
            stop(kill=False)  # drained: leave now
            continue
        now = time.monotonic()
        if kill_at <= now:
            kill_at = math.inf
            for pid in children:
                signal_group(pid, signal.SIGKILL)
        for key, _ in sel.select(None if kill_at == math.inf else max(0.0, kill_at - now)):
            if key.data == _PARENT:
                sel.unregister(key.fd)
                orphan()
                continue
            if key.data is not None:  # a child's pidfd
                pid = key.data
                status = reap(pid)
                try:
                    send(("exited", pid, status))
                except OSError:
                    pass
                continue
            if not running:
                continue  # stopped by an earlier event of this same select: read nothing more
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                # The supervisor closes its end only after we have left: the caller died.  This
                # comes before our parent's pidfd tells (a process's descriptors close before
                # its exit is reported): we may have reaped every worker and left by then.
                orphan()
                continue
            msg = pickle.loads(data)
            if msg[0] == "spawn":
                _, slot, serial = msg
                if draining:
                    send(("failed", slot, serial, "the fork server is draining"))
                    continue
                try:
                    pid, wsock = fork_worker(ctx, slot, serial)
                except OSError as exc:
                    send(("failed", slot, serial, f"fork failed: {exc}"))
                    continue
                fd = os.pidfd_open(pid)
                children[pid] = fd
                ctx.internal_fds.add(fd)
                sel.register(fd, selectors.EVENT_READ, pid)
                try:
                    send(("spawned", slot, serial, pid), [wsock.fileno()])
                finally:
                    wsock.close()
            elif msg[0] == "signal":
                _, pid, sig, group = msg
                if pid in children:
                    signal_group(pid, sig, group)
            elif msg[0] == "here":
                here.update(msg[1])
            elif msg[0] == "gone":
                here.difference_update(msg[1:])
            elif msg[0] == "drain":
                draining = True
            elif msg[0] == "stop" and running:
                _, graceful, grace = msg
                stop(kill=not graceful, grace=grace)
    sel.close()
