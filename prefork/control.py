"""A pool's control socket: what ``prefork status`` and ``prefork ctl`` talk to.

::

    prefork status / ctl, request()  ──connect──▶  <directory>/<name>.sock
    (any process of the same user, or root)        Unix stream socket, mode 0600,
                                                   in a directory of ours, mode 0700
        one request line  ──▶  {"v": 1, "op": "status" | "add" | "remove" | "reload" | "stop", ...}
        one answer line   ◀──  {"v": 1, "ok": true, ...}  or  {"v": 1, "ok": false, "error": "..."}

                                ControlServer (a daemon thread of the pool's process)
                                  one selector: the listening socket, a wake pipe, every
                                  client, non-blocking; peer checked by SO_PEERCRED
                                    │  status()  resize(±n)  retire_all()  shutdown()
                                    ▼
                                the pool (any ``ControlledPool``: the Supervisor)

The directory is ``$XDG_RUNTIME_DIR/prefork``, else ``/tmp/prefork-$UID``.  The
server creates it (mode 0700) and refuses to use it unless it is a real
directory (no symlink), owned by the server's user and writable by no one else.

Who may connect: the pool's own user, and root.  The socket's mode (0600) and
the directory's (0700) already keep other users out; the server also checks
each connection's peer credentials, so a socket made reachable by mistake (a
``chmod``) still answers nobody else.  Root is let in because it can signal,
trace or kill the pool anyway; refusing it would only break ``sudo prefork ctl``.

No socket is left behind.  The server binds under a temporary name and
hard-links it into place, which fails if the name exists: then a socket that
refuses connections (its pool died, even by SIGKILL) is removed and replaced,
while one that answers belongs to a live pool, and the start fails naming the
pid that holds it.  ``close()`` removes the socket only if the file is still
the one this server made (same inode) and only in the process that made it
(a forked child closing its copy removes nothing).

Hostile or broken clients cost little: a request is one line of at most
``MAX_REQUEST`` bytes that must arrive within ``timeout`` seconds, every client
is served by the same non-blocking loop (a silent one blocks no other), and at
most ``MAX_CLIENTS`` are held at once (the oldest is dropped for a new one).
Whatever a client sends, it gets one answer line and the server keeps serving.

The parts: this module is the server (:class:`ControlServer`) and the public
face of them all; the protocol and what each op does to the pool are in
``prefork/_control_protocol.py``, where sockets live and who answers on one in
``prefork/_control_paths.py``, the client (:func:`request`, :func:`fetch_status`,
:func:`list_pools`) in ``prefork/_control_client.py``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from prefork._control_client import PoolSocket, fetch_status, list_pools, request
from prefork._control_client import _scan as _scan  # prefork._control_cli imports it from here
from prefork._control_paths import (
    _TEMP_PREFIX,
    SUN_PATH_MAX,
    _peer,
    _publish,
    _sweep_temporaries,
    _unlink_if,
    check_name,
    control_directory,
    default_directory,
    socket_path,
)
from prefork._control_paths import NameTaken as NameTaken  # prefork._operate imports it from here
from prefork._control_protocol import (
    _SEND_FLAGS,
    MAX_REQUEST,
    OPS,
    PROTOCOL_VERSION,
    ControlledPool,
    Operations,
    _error,
)
from prefork._threads import join_thread
from prefork.errors import ConfigError

__all__ = [
    "MAX_CLIENTS",
    "MAX_REQUEST",
    "OPS",
    "PROTOCOL_VERSION",
    "ControlServer",
    "ControlledPool",
    "PoolSocket",
    "check_name",
    "control_directory",
    "default_directory",
    "fetch_status",
    "list_pools",
    "request",
    "socket_path",
]

log = logging.getLogger("prefork.control")

MAX_CLIENTS: Final = 128  #: connections held at once; a new one drops the oldest
REQUEST_TIMEOUT: Final = 2.0  #: seconds a client has to send its request, and then to read the answer
BACKLOG: Final = 128


class _Client:
    __slots__ = ("after", "buf", "deadline", "out", "pid", "sock", "uid")

    def __init__(self, sock: socket.socket, pid: int, uid: int, deadline: float) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.deadline = deadline
        self.buf = bytearray()
        self.out: bytes | None = None  # the answer, once there is one
        self.after: Callable[[], None] | None = None  # what to do once the answer is out (stop)


class ControlServer:
    """The control socket of one pool; ``start()`` it, ``close()`` it.

    ``name`` names the socket (``<directory>/<name>.sock``); ``directory``
    defaults to ``default_directory()``.  ``timeout`` is the time a client has
    to send its request line, and then to read the answer.  ``claim()`` makes
    the socket without starting the thread (a pool calls it before it forks, so
    that a name in use fails early); ``start()`` claims if needed and serves.
    """

    def __init__(
        self,
        pool: ControlledPool,
        name: str,
        *,
        directory: str | os.PathLike[str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"control timeout = {timeout!r}: must be a number of seconds > 0")
        if max_clients < 1:
            raise ConfigError(f"control max_clients = {max_clients!r}: must be >= 1")
        self.pool = pool
        self.name = check_name(name)
        self._ops = Operations(pool, self.name)
        self.timeout = float(timeout)
        self.max_clients = max_clients
        self._directory = directory
        self.path: Path | None = None  #: the socket, once claimed
        self._ident: tuple[int, int] | None = None
        self._owner_pid = 0
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._clients: dict[int, _Client] = {}  # by fd, oldest first
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._released = False
        self._accept_paused_until = 0.0

    # -- life cycle ---------------------------------------------------------------------------

    def claim(self) -> ControlServer:
        """Make the socket (replacing a stale one); ``ConfigError`` if a live pool holds the name."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this control server was closed")
            if self._listener is not None:
                return self
            directory = control_directory(self._directory, create=True)
            path = socket_path(self.name, directory)
            _sweep_temporaries(directory)
            temp = directory / f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            if len(os.fsencode(temp)) > SUN_PATH_MAX:  # the socket is bound there first
                raise ConfigError(
                    f"control directory {directory} is too long: a socket in it needs {len(os.fsencode(temp))} bytes "
                    f"of path, a Unix socket path holds at most {SUN_PATH_MAX}: choose a shorter directory"
                )
            sel = selectors.DefaultSelector()
            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                listener.bind(os.fspath(temp))
                try:
                    os.chmod(temp, 0o600)
                    listener.listen(BACKLOG)
                    st = os.lstat(temp)
                    ident = (st.st_dev, st.st_ino)
                    _publish(temp, path, self.name)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                sel.close()
                os.close(wake_r)
                os.close(wake_w)
                raise
            self._sel = sel
            self._wake_r, self._wake_w = wake_r, wake_w
            self._listener = listener
            self.path = path
            self._ident = ident
            self._owner_pid = os.getpid()
            log.debug("pool %r: control socket %s", self.name, path)
            return self

    def start(self) -> ControlServer:
        """Claim the socket if not yet done, and serve it from a daemon thread."""
        self.claim()
        with self._lock:
            if self._closed:
                raise RuntimeError("this control server was closed")
            if self._thread is None:
                assert self._sel is not None and self._listener is not None
                self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
                self._sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
                self._thread = threading.Thread(target=self._serve, name=f"{self.name}-control", daemon=True)
                self._thread.start()
        return self

    @property
    def fds(self) -> frozenset[int]:
        """This server's lasting descriptors (socket, selector, wake pipe): a process the pool
        forks should close them (``WorkerContext.internal_fds``)."""
        with self._lock:
            fds = {self._wake_r, self._wake_w}
            if self._listener is not None:
                fds.add(self._listener.fileno())
            fileno = getattr(self._sel, "fileno", None)  # epoll and kqueue selectors have one
            if fileno is not None:
                fds.add(fileno())
            return frozenset(fd for fd in fds if fd >= 0)

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving and remove the socket (if it is still ours); waits ``timeout`` s at most
        for the thread.  Safe to call twice, from any thread, and in a forked child (which
        closes its copies and removes nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if self.path is not None and os.getpid() == self._owner_pid:
            _unlink_if(self.path, self._ident)
        if thread is not None and thread.is_alive():
            self._wake()
            if thread is not threading.current_thread():
                join_thread(thread, timeout)
        if thread is None or not thread.is_alive():
            self._release()

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    def _release(self) -> None:
        """Close every descriptor (once)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            clients, self._clients = list(self._clients.values()), {}
            for client in clients:
                client.sock.close()
            if self._sel is not None:
                self._sel.close()
            if self._listener is not None:
                self._listener.close()
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    # -- the loop -----------------------------------------------------------------------------

    def _serve(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while self._serving():
                events = sel.select(self._next_wait(time.monotonic()))
                for key, mask in events:
                    if not self._serving():
                        break
                    try:
                        key.data(key.fileobj, mask)
                    except Exception:
                        log.exception("pool %r: the control server failed on one connection", self.name)
                        client = self._clients.get(key.fd)
                        if client is not None:
                            self._drop(client)
                self._expire(time.monotonic())
        except Exception:
            log.exception("pool %r: the control server stopped", self.name)
        finally:
            self._finish()

    def _serving(self) -> bool:
        return not self._closed  # set by close(), from any thread

    def _finish(self) -> None:
        """Closing: a stop already answered must still happen."""
        pending = [c.after for c in self._clients.values() if c.after is not None]
        for client in list(self._clients.values()):
            if client.out:
                with contextlib.suppress(OSError):
                    client.sock.send(client.out, _SEND_FLAGS)
        self._release()
        for after in pending:
            self._run_after(after)

    def _next_wait(self, now: float) -> float:
        wait = 1.0
        for client in self._clients.values():
            wait = min(wait, client.deadline - now)
        if self._accept_paused_until:
            wait = min(wait, self._accept_paused_until - now)
        return max(0.0, wait)

    def _drain_wake(self, fd: Any, mask: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)

    def _accept(self, listener: Any, mask: int) -> None:
        assert self._listener is not None and self._sel is not None
        for _ in range(64):  # a burst of connections: take many per wakeup, not all
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and self._clients:
                    self._drop(next(iter(self._clients.values())), "too many connections")
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("pool %r: control socket cannot accept (%s); pausing 0.1 s", self.name, exc.strerror)
                    self._sel.unregister(self._listener)
                    self._accept_paused_until = time.monotonic() + 0.1
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        assert self._sel is not None
        conn.setblocking(False)
        pid, uid, _gid = _peer(conn)
        me = os.geteuid()
        if uid not in (me, 0):
            log.warning("pool %r: control connection from pid %d uid %d refused (only uid %d and root)", self.name, pid, uid, me)
            with contextlib.suppress(OSError):
                conn.send(_error(f"refused: uid {uid} may not control this pool (only its owner, uid {me}, and root)"), _SEND_FLAGS)
            conn.close()
            return
        while len(self._clients) >= self.max_clients:
            self._drop(next(iter(self._clients.values())), "too many connections: this one was the oldest")
        client = _Client(conn, pid, uid, time.monotonic() + self.timeout)
        self._clients[conn.fileno()] = client
        self._sel.register(conn, selectors.EVENT_READ, lambda sock, mask: self._on_client(client, mask))

    def _expire(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until and self._listener is not None:
            self._accept_paused_until = 0.0
            assert self._sel is not None
            self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            if client.out is None:
                self._drop(client, f"no complete request line within {self.timeout:g} s")
            else:
                self._drop(client)  # it does not read its answer

    def _drop(self, client: _Client, error: str | None = None) -> None:
        """Close a client (sending ``error`` first, if it fits); run its ``after``."""
        if self._clients.pop(client.sock.fileno(), None) is None:
            return
        if error is not None and client.out is None:
            with contextlib.suppress(OSError):
                client.sock.send(_error(error), _SEND_FLAGS)
        assert self._sel is not None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        client.sock.close()
        if client.after is not None:
            after, client.after = client.after, None
            self._run_after(after)

    def _on_client(self, client: _Client, mask: int) -> None:
        if client.out is not None:
            self._flush(client)
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:  # end of stream: what came is the request (a client may send no newline)
            if client.buf.strip():
                self._respond(client, bytes(client.buf), b"")
            else:
                self._drop(client)  # a probe: connected, sent nothing
            return
        start = len(client.buf)
        client.buf += data
        end = client.buf.find(b"\n", start)
        if end >= 0 and end <= MAX_REQUEST:
            self._respond(client, bytes(client.buf[:end]), bytes(client.buf[end + 1:]))
        elif len(client.buf) > MAX_REQUEST:
            self._drop(client, f"request too long: more than {MAX_REQUEST} bytes without a newline")

    def _respond(self, client: _Client, line: bytes, rest: bytes) -> None:
        if rest.strip():
            answer, after = _error(f"one request per connection: {len(rest)} more bytes came after the request line"), None
        else:
            answer, after = self._ops.answer(line.rstrip(b"\r"), client.pid, client.uid)
        client.out = answer
        client.after = after
        client.buf = bytearray()
        client.deadline = time.monotonic() + self.timeout
        assert self._sel is not None
        self._sel.modify(client.sock, selectors.EVENT_WRITE, lambda sock, mask: self._on_client(client, mask))
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        assert client.out is not None
        try:
            sent = client.sock.send(client.out, _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self._drop(client)

    @staticmethod
    def _run_after(after: Callable[[], None]) -> None:
        try:
            after()
        except Exception:
            log.exception("a control action failed after its answer was sent")
