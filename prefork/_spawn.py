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

    So a caller with no threads of its own never forks with threads (Python 3.12+
    warns when a process with threads forks).  The one fork made later, beside the
    supervisor's thread: the replacement of a fork server that died, a copy of the
    caller as it is then (docs/reliability.md, "Forking and threads").
Direct
    The supervisor's process forks.  Needed when the child must continue the
    caller's own code (MPM's ``kid_new``); forking from a process with threads
    is then the caller's responsibility.

Both watch each child through a pidfd, so no exit is lost and no SIGCHLD
handler is needed.  Events come back as tuples:
``Spawned(slot, serial, pid, sock)``, ``("failed", slot, serial, text)``,
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

import os
import pickle
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from prefork._fork import fork_worker, reap_worker, recv_fds, signal_group
from prefork._fork_server import STOP_GRACE, serve
from prefork._worker import WorkerContext


class Spawned(NamedTuple):
    """A worker was forked for ``slot``: its pid and the supervisor's end of its socket."""

    slot: int
    serial: int
    pid: int
    sock: socket.socket


class SpawnFailed(NamedTuple):
    """No worker could be forked for ``slot``: why."""

    slot: int
    serial: int
    text: str


class Exited(NamedTuple):
    """A worker exited and was reaped: its wait status."""

    pid: int
    status: int


#: what a spawner reports
Event = Spawned | SpawnFailed | Exited
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
            self._ready.append(SpawnFailed(slot, serial, f"fork failed: {exc}"))
            return
        fd = os.pidfd_open(pid)
        self._pidfds[fd] = pid
        # later forks (the fork server's among them) must not keep this worker's socket open
        self.ctx.internal_fds.update((fd, sock.fileno()))
        self._ready.append(Spawned(slot, serial, pid, sock))

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
        return [Exited(pid, reap_worker(pid))]

    def close_spent(self) -> None:
        """Close the pidfds of reaped workers (call after unregistering them)."""
        for fd in self._spent:
            self.ctx.internal_fds.discard(fd)
            os.close(fd)
        self._spent.clear()

    def signal(self, pid: int, sig: int, group: bool = True) -> None:
        if self.owns(pid):
            signal_group(pid, sig, group)

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        for fd, pid in list(self._pidfds.items()):
            signal_group(pid, signal.SIGKILL)
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
            serve(self.ctx, child, me, here)
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
            self._ready.append(SpawnFailed(slot, serial, "the fork server is gone"))

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
            self._notify(("gone", *(event.pid for event in events if isinstance(event, Exited))))
            return events
        assert self._sock is not None
        events = []
        while True:
            try:
                data, fds, _flags, _addr = recv_fds(self._sock)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                continue  # see _recv_fds: what the server sent before it left is still to read
            except OSError:
                data, fds = b"", []
            if not data:
                self._dead = True
                break
            msg = pickle.loads(data)  # from our own fork server, over a private socketpair
            if msg[0] == "spawned":
                _, slot, serial, pid = msg
                self._served.add(pid)
                events.append(Spawned(slot, serial, pid, socket.socket(fileno=fds[0])))
                continue
            for extra in fds:
                os.close(extra)
            if msg[0] == "exited":
                self._served.discard(msg[1])
                events.append(Exited(msg[1], msg[2]))
            elif msg[0] == "failed":
                events.append(SpawnFailed(msg[1], msg[2], msg[3]))
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
                data, fds, _flags, _addr = recv_fds(self._sock)
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

