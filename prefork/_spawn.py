"""Where workers are forked: a fork server (the default) or the supervisor itself.

ForkServer
    At pool start the caller forks one small process, the fork server, before
    the supervisor starts its thread.  It holds a copy of the pool's context
    (initializer, resolver, hooks: nothing is pickled), forks every worker,
    hands the supervisor its end of the worker's socket over SCM_RIGHTS, and
    reports each exit status.  Workers never inherit the caller's threads or
    whatever locks those threads held after the pool started.

    The first worker, when the pool starts from the main thread, is forked by
    the caller itself, at the same moment and so with the same safety as the
    fork server, which is forked right after it: it boots while the server
    starts instead of waiting for it (a fork and a boot less before the first
    result).  Its parent death signal belongs to the main thread, which lives as
    long as the process.  The supervisor watches and reaps it as ``Direct`` does.
Direct
    The supervisor's process forks.  Needed when the child must continue the
    caller's own code (MPM's ``kid_new``); forking from a process with threads
    is then the caller's responsibility.

Both watch each child through a pidfd, so no exit is lost and no SIGCHLD
handler is needed.  Events come back as tuples:
``("spawned", slot, serial, pid, sock)``, ``("failed", slot, serial, text)``,
``("exited", pid, status)``.

The fork server also watches its own parent, the caller, through a pidfd: the
end of its control socket is not enough, since any process the caller forks
later (a ``multiprocessing`` child, say) inherits the caller's end whatever its
close-on-exec flag.  When the caller dies the server kills the process groups
of its workers and of the workers the caller forked itself (it is told their
pids), so that nothing a task started outlives the pool.  A graceful stop (after
``drain``) kills nobody: a worker the supervisor gave up on while it booted
sees the end of its channel and leaves through its finalizer.
"""

from __future__ import annotations

import array
import atexit
import gc
import math
import os
import pickle
import selectors
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Final, NoReturn

from prefork import _scoreboard
from prefork._proctitle import set_title
from prefork._task import WorkerInfo
from prefork._worker import ForkedChild, WorkerContext, close_fds, leave, prepare, reset_signals, run_worker

Event = tuple[Any, ...]


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}

#: seconds the fork server waits, on a graceful stop, for workers the supervisor gave up on
#: while they booted (they finish their initializer, then run their finalizer) before SIGKILL;
#: ``ForkServer.stop_grace`` (the default of boot_timeout)
STOP_GRACE: Final = 30.0

_PARENT: Final = "parent"  #: selector data of the fork server's pidfd on its parent


def fork_worker(ctx: WorkerContext, slot: int, serial: int) -> tuple[int, socket.socket]:
    """Fork one worker; returns its pid and the supervisor's end of its socket."""
    parent_sock, child_sock = ctx.transport.socketpair()
    info = WorkerInfo(slot=slot, name=ctx.name, serial=serial)
    ctx.hook.prefork_before_fork(worker=info)
    ctx.scoreboard.reset(slot, pid=-1)
    me = os.getpid()
    # Until the child has reset its handlers, a stop signal must wait (pending), not run the
    # parent's handler in the child or be lost: block it around the fork; prepare() unblocks.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if pid == 0:
        parent_sock.close()
        if ctx.return_in_child:
            handle = prepare(ctx, info, child_sock, me)
            if isinstance(handle, int):
                os._exit(handle)
            atexit.register(leave, ctx, info, "the child's code ended")
            raise ForkedChild(handle)
        run_worker(ctx, info, child_sock, me)
    child_sock.close()
    info.pid = pid
    ctx.scoreboard.words[slot * _scoreboard.WORDS + _scoreboard.PID] = pid
    ctx.hook.prefork_after_fork(worker=info)
    return pid, parent_sock


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int], int, Any]:
    """``socket.recv_fds`` with the descriptors close-on-exec from the start, so that no
    program a thread of this process runs meanwhile inherits a worker's socket
    (``socket.recv_fds`` drops its ``flags`` argument before Python 3.12).

    A server that left with a message of ours unread (a "gone" crossing its leaving)
    makes one read fail with ECONNRESET *before* the messages it sent are read: the
    next read returns them, then end of stream."""
    fds = array.array("i")
    data, ancdata, flags, addr = sock.recvmsg(65536, socket.CMSG_LEN(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), flags, addr


def _signal_group(pid: int, sig: int, group: bool = True) -> None:
    """``sig`` to the worker's process group (what its tasks started too), or to it alone."""
    if group:
        try:
            os.killpg(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap_worker(pid: int) -> int:
    """Reap an exited worker after killing what is left of its process group.

    While the worker is a zombie its pid cannot be reused, so the group kill
    reaches only what its tasks started and left behind: no orphan survives it.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return os.waitpid(pid, 0)[1]


class DirectSpawner:
    """Forks in the supervisor's own process."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._pidfds: dict[int, int] = {}  # pidfd -> pid
        self._ready: list[Event] = []
        self._spent: list[int] = []  # pidfds of reaped workers, closed once the caller stopped watching them

    def start(self) -> None:
        pass

    def fds(self) -> list[int]:
        return list(self._pidfds)

    def spawn(self, slot: int, serial: int) -> None:
        try:
            pid, sock = fork_worker(self.ctx, slot, serial)
        except OSError as exc:
            self._ready.append(("failed", slot, serial, f"fork failed: {exc}"))
            return
        fd = os.pidfd_open(pid)
        self._pidfds[fd] = pid
        # later forks (the fork server's among them) must not keep this worker's socket open
        self.ctx.internal_fds.update((fd, sock.fileno()))
        self._ready.append(("spawned", slot, serial, pid, sock))

    def owns(self, pid: int) -> bool:
        return pid in self._pidfds.values()

    def pids(self) -> list[int]:
        """The workers forked here and not reaped yet."""
        return list(self._pidfds.values())

    def watches(self, fd: int) -> bool:
        return fd in self._pidfds

    def take_ready(self) -> list[Event]:
        ready, self._ready = self._ready, []
        return ready

    def on_readable(self, fd: int) -> list[Event]:
        pid = self._pidfds.pop(fd)
        # Not closed yet: the caller's selector must forget it first.  A pidfd closed while
        # still registered stays in the epoll set as long as a new worker forked meanwhile
        # holds a copy; its number, reused by the next pidfd, then reports the old exit
        # for the new worker (whose waitpid would block).
        self._spent.append(fd)
        return [("exited", pid, reap_worker(pid))]

    def close_spent(self) -> None:
        """Close the pidfds of reaped workers (call after unregistering them)."""
        for fd in self._spent:
            self.ctx.internal_fds.discard(fd)
            os.close(fd)
        self._spent.clear()

    def signal(self, pid: int, sig: int, group: bool = True) -> None:
        if self.owns(pid):
            _signal_group(pid, sig, group)

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        for fd, pid in list(self._pidfds.items()):
            _signal_group(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
            self.ctx.internal_fds.discard(fd)
        self._pidfds.clear()
        self.close_spent()


class ForkServer:
    """A single-threaded process that forks the workers (see the module docstring)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.pid = 0
        self._sock: socket.socket | None = None
        self._pidfd = -1
        self._dead = False
        self._ready: list[Event] = []
        self._here: DirectSpawner | None = None  # the worker the caller forked at start
        self._forking_here = False
        self._deferred: list[tuple[Any, ...]] = []  # spawn requests made before the server was up
        self._served: set[int] = set()  # pids the server forked whose exit it has not reported
        self.draining = False
        #: on a graceful stop, seconds the server waits for workers still leaving before SIGKILL
        self.stop_grace = STOP_GRACE

    def start(self, first: Callable[[], object] | None = None) -> None:
        """Fork the server.  ``first`` asks for the first workers: from the main
        thread they are forked here and now, before the server, else by it."""
        if first is not None and threading.current_thread() is threading.main_thread():
            self._here = self._here or DirectSpawner(self.ctx)
            self._forking_here = True
            try:
                first()
            finally:
                self._forking_here = False
            self._start_server()
            for msg in self._deferred:
                self._send(msg)
            self._deferred.clear()
            return
        self._start_server()
        if first is not None:
            first()

    def drain(self) -> None:
        """No more spawns: the server leaves as soon as its last worker has exited,
        while the others are still stopping, so that ``stop`` finds it gone."""
        if not self.draining:
            self.draining = True
            self._send(("drain",))

    def detach_here(self) -> DirectSpawner | None:
        """The workers forked in the caller, which outlive this server."""
        here, self._here = self._here, None
        return here

    def adopt(self, here: DirectSpawner | None) -> None:
        self._here = here
        if here is not None and here.pids():
            self._notify(("here", here.pids()))  # the server kills their groups if we die

    def _start_server(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        me = os.getpid()
        here = self._here.pids() if self._here is not None else []
        pid = os.fork()
        if pid == 0:
            parent.close()
            _serve(self.ctx, child, me, here)
        child.close()
        parent.setblocking(False)
        self.pid = pid
        self._sock = parent
        self._pidfd = os.pidfd_open(pid)
        self.ctx.internal_fds.update((parent.fileno(), self._pidfd))

    def fds(self) -> list[int]:
        fds = [self._sock.fileno()] if self._sock is not None and not self._dead else []
        return fds + self._here.fds() if self._here is not None else fds

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._sock is None or self._dead:
            return
        try:
            self._sock.send(pickle.dumps(msg))
        except OSError:
            self._dead = True

    def _notify(self, msg: tuple[Any, ...]) -> None:
        """A message the server may miss: one that has left (drained) or died is not
        taken for dead here; its end of stream says so."""
        if self._sock is not None and not self._dead:
            try:
                self._sock.send(pickle.dumps(msg))
            except OSError:
                pass

    def spawn(self, slot: int, serial: int) -> None:
        if self._forking_here:
            # One worker is forked here: each fork costs this process a page fault for
            # every page it writes next (~10 us each here), so the rest go to the server.
            assert self._here is not None
            if not self._deferred and not self._here.fds():  # none forked here yet
                self._here.spawn(slot, serial)
            else:
                self._deferred.append(("spawn", slot, serial))
            return
        self._send(("spawn", slot, serial))
        if self._dead:
            self._ready.append(("failed", slot, serial, "the fork server is gone"))

    def take_ready(self) -> list[Event]:
        ready, self._ready = self._ready, []
        return ready + self._here.take_ready() if self._here is not None else ready

    def close_spent(self) -> None:
        """Close the pidfds of reaped workers forked here (after the caller unregistered them)."""
        if self._here is not None:
            self._here.close_spent()

    def forked_here(self, pid: int) -> bool:
        return self._here is not None and self._here.owns(pid)

    def signal(self, pid: int, sig: int, group: bool = True) -> None:
        if self._here is not None and self._here.owns(pid):
            self._here.signal(pid, sig, group)
            return
        self._send(("signal", pid, sig, group))

    def alive(self) -> bool:
        return not self._dead

    def on_readable(self, fd: int) -> list[Event]:
        if self._here is not None and self._here.watches(fd):
            events = self._here.on_readable(fd)
            # reaped, its group killed: the server need not kill that group if we die
            self._notify(("gone", *(event[1] for event in events)))
            return events
        assert self._sock is not None
        events = []
        while True:
            try:
                data, fds, _flags, _addr = _recv_fds(self._sock)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                continue  # see _recv_fds: what the server sent before it left is still to read
            except OSError:
                data, fds = b"", []
            if not data:
                self._dead = True
                break
            msg = pickle.loads(data)
            if msg[0] == "spawned":
                _, slot, serial, pid = msg
                self._served.add(pid)
                events.append(("spawned", slot, serial, pid, socket.socket(fileno=fds[0])))
            else:
                for extra in fds:
                    os.close(extra)
                if msg[0] == "exited":
                    self._served.discard(msg[1])
                events.append(msg)
        return events

    def stop(self) -> None:
        """Stop the server and wait for it.  After ``drain`` the stop is graceful: the
        server kills nobody and leaves when its last worker has."""
        if self._here is not None:
            self._here.stop()
        if self._sock is not None:
            self._send(("stop", self.draining, self.stop_grace))
            self._drain_socket()
            status = 0
            try:
                status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:
                pass
            if os.WIFSIGNALED(status):
                # Killed, it could not kill its workers' groups: they died by their parent
                # death signal, but what their tasks started would live on.  Their pids are
                # still pinned as process group ids while any such process lives.
                for pid in self._served:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            self._served.clear()
            self.ctx.internal_fds.discard(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._pidfd >= 0:
            self.ctx.internal_fds.discard(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _drain_socket(self) -> None:
        """Read what the server still sends until it exits.  A worker socket still in
        flight (a worker the supervisor gave up on during its boot, say) is closed here,
        so that worker sees end of stream and leaves instead of waiting for a frame while
        the server waits for it."""
        assert self._sock is not None
        self._sock.setblocking(True)
        while True:
            try:
                data, fds, _flags, _addr = _recv_fds(self._sock)
            except (InterruptedError, ConnectionResetError):
                continue  # see _recv_fds
            except OSError:
                return
            for fd in fds:
                os.close(fd)
            if not data:
                return
            msg = pickle.loads(data)
            if msg[0] == "exited":
                self._served.discard(msg[1])


def _serve(ctx: WorkerContext, sock: socket.socket, parent_pid: int, here: list[int]) -> NoReturn:
    children: dict[int, int] = {}  # pid -> pidfd
    code = 0
    try:
        _serve_loop(ctx, sock, parent_pid, set(here), children)
    except BaseException:
        traceback.print_exc()
        code = 1
        for pid in children:  # they die with us (parent death signal); what their tasks started must too
            _signal_group(pid, signal.SIGKILL)
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
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    set_title(f"{ctx.name} forkserver")
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
                _signal_group(pid, signal.SIGTERM, group=False)

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
                _signal_group(pid, signal.SIGKILL)
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
                    _signal_group(pid, sig, group)
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
