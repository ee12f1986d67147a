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
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import secrets
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from prefork.errors import ConfigError

if TYPE_CHECKING:
    from prefork._supervisor import Supervisor

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

PROTOCOL_VERSION: Final = 1
#: the operations a request may name
OPS: Final = ("add", "reload", "remove", "status", "stop")
MAX_REQUEST: Final = 64 * 1024  #: bytes a request line may have (a real one has about 40)
MAX_RESPONSE: Final = 64 * 1024 * 1024  #: bytes a client reads at most (a status of 4096 workers is ~1 MB)
MAX_CLIENTS: Final = 128  #: connections held at once; a new one drops the oldest
REQUEST_TIMEOUT: Final = 2.0  #: seconds a client has to send its request, and then to read the answer
CLIENT_TIMEOUT: Final = 5.0  #: seconds ``request`` waits for the pool by default
PROBE_TIMEOUT: Final = 1.0  #: seconds a start waits when it asks whether a socket's pool is alive
BACKLOG: Final = 128
SUN_PATH_MAX: Final = 107  #: bytes of a Unix socket path (sun_path is 108 with its NUL)
NAME_MAX: Final = 64

_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TEMP_PREFIX: Final = ".tmp-"
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid
_SEND_FLAGS: Final = getattr(socket, "MSG_NOSIGNAL", 0)


# -- where sockets live -----------------------------------------------------------------------


def check_name(name: str) -> str:
    """``name`` if it can name a control socket (it becomes a file name), else ``ConfigError``."""
    if not isinstance(name, str) or len(name) > NAME_MAX or not _NAME.fullmatch(name):
        raise ConfigError(
            f"pool name {name!r} cannot name a control socket: use 1 to {NAME_MAX} letters, digits, "
            "'_', '.' or '-', starting with a letter, digit or '_'"
        )
    return name


def default_directory() -> Path:
    """``$XDG_RUNTIME_DIR/prefork`` when that variable names an existing directory, else ``/tmp/prefork-$UID``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg) / "prefork"
    return Path("/tmp") / f"prefork-{os.geteuid()}"


def _unsafe(path: Path, st: os.stat_result, any_owner: bool) -> str | None:
    """Why the directory ``path`` (its ``lstat``) must not hold control sockets, or ``None``."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    me = os.geteuid()
    if not any_owner and st.st_uid != me:
        return f"belongs to uid {st.st_uid}, not to you (uid {me})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def control_directory(directory: str | os.PathLike[str] | None = None, *, create: bool = False) -> Path:
    """The directory of the control sockets (``directory``, else ``default_directory()``), checked.

    ``create`` makes it (mode 0700) when missing; a pool's server does, a client
    does not.  A server wants it owned by its own user; a client run by root
    accepts any owner (to reach another user's pool).  ``ConfigError`` when it is
    unsafe or cannot be made; ``FileNotFoundError`` when it is missing and not created.
    """
    path = Path(directory) if directory is not None else default_directory()
    if create:
        try:
            os.mkdir(path, 0o700)
            log.debug("made the control directory %s", path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"control directory {path}: cannot create it: {exc.strerror or exc}") from exc
    st = os.lstat(path)  # FileNotFoundError: the caller says what that means
    why = _unsafe(path, st, any_owner=not create and os.geteuid() == 0)
    if why is not None:
        raise ConfigError(
            f"control directory {path} {why}; remove or fix it (it must be a directory of yours "
            "that no one else may write, mode 0700)"
        )
    return path


def socket_path(name: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """Where the control socket of the pool ``name`` is (not checked for existence)."""
    base = Path(directory) if directory is not None else default_directory()
    path = base / f"{check_name(name)}.sock"
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise ConfigError(
            f"control socket path {path} is {size} bytes long; a Unix socket path holds at most "
            f"{SUN_PATH_MAX}: use a shorter pool name or control directory"
        )
    return path


# -- who is at the other end ----------------------------------------------------------------


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (for a client: the one that listened)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def _alive(pid: int) -> bool:
    """Does ``pid`` run (a zombie does not)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NameTaken(ConfigError):
    """A live pool holds the control socket of this name."""


class _Probe(NamedTuple):
    state: str  #: live | busy | stale | missing | not-socket
    pid: int | None = None
    ident: tuple[int, int] | None = None  #: (st_dev, st_ino) of the file probed


def _probe(path: Path, timeout: float) -> _Probe:
    """Is a pool listening on ``path``?  ``stale``: the file is there, nobody accepts."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return _Probe("missing")
    ident = (st.st_dev, st.st_ino)
    if not stat.S_ISSOCK(st.st_mode):
        return _Probe("not-socket", ident=ident)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except ConnectionRefusedError:
            return _Probe("stale", ident=ident)
        except FileNotFoundError:
            return _Probe("missing")
        except (TimeoutError, BlockingIOError):  # its backlog is full: alive, and busy
            return _Probe("busy", ident=ident)
        pid = _peer(sock)[0]
        if pid > 0 and not _alive(pid):
            # the pool died but a process it forked holds its listening socket: nobody will answer
            return _Probe("stale", pid, ident)
        return _Probe("live", pid or None, ident)


def _unlink_if(path: Path, ident: tuple[int, int] | None) -> bool:
    """Remove ``path`` if it is still the file ``ident`` names."""
    try:
        st = os.lstat(path)
        if ident is not None and (st.st_dev, st.st_ino) != ident:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _sweep_temporaries(directory: Path) -> None:
    """Remove temporary sockets that starts interrupted by a kill left (their pid is gone)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for entry in names:
        if not entry.startswith(_TEMP_PREFIX):
            continue
        pid = entry[len(_TEMP_PREFIX):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(directory / entry)


# -- the pool side ------------------------------------------------------------------------------


class _PoolSettings(Protocol):
    @property
    def kill_grace(self) -> float: ...


class _Config(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def pool(self) -> _PoolSettings: ...


class ControlledPool(Protocol):
    """What the control server needs of a pool (``prefork._supervisor.Supervisor`` has it)."""

    @property
    def config(self) -> _Config: ...

    @property
    def stopped(self) -> bool: ...

    @property
    def closing(self) -> bool: ...

    @property
    def broken(self) -> BaseException | None: ...

    def status(self) -> dict[str, Any]: ...

    def resize(self, delta: int) -> object: ...

    def retire_all(self, reason: str) -> None: ...

    def shutdown(self, wait: bool = True, cancel_futures: bool = False, force: bool = False) -> None: ...


if TYPE_CHECKING:

    def _supervisor_is_controllable(sup: Supervisor) -> ControlledPool:
        return sup  # mypy checks here that the Supervisor keeps this contract


class _BadRequest(Exception):
    """The request is wrong, or the pool cannot do it now: the message is the answer's ``error``."""


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


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _encode(answer: dict[str, Any]) -> bytes:
    return json.dumps(_finite(answer), separators=(",", ":"), default=str).encode() + b"\n"


def _error(message: str) -> bytes:
    return _encode({"v": PROTOCOL_VERSION, "ok": False, "error": message})


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest(f"{what}: n must be a whole number >= 1, got {json.dumps(value)}")
    return value


def _parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """The op and fields of one request line, or ``_BadRequest`` saying what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRequest(f"the request is not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"the request is not JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise _BadRequest("the request is not JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise _BadRequest(f"the request must be a JSON object, got {type(data).__name__}")
    version = data.pop("v", None)
    if version is None:
        raise _BadRequest(f'the request has no protocol version "v" (this pool speaks {PROTOCOL_VERSION})')
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise _BadRequest(f"protocol version {json.dumps(version)} is not supported (this pool speaks {PROTOCOL_VERSION})")
    op = data.pop("op", None)
    if not isinstance(op, str):
        raise _BadRequest(f'the request names no "op" (one of {", ".join(OPS)})')
    if op not in OPS:
        raise _BadRequest(f"unknown op {op[:40]!r} (ops: {', '.join(OPS)})")
    allowed = {"add": ("n",), "remove": ("n",), "stop": ("graceful",)}.get(op, ())
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no fields"
        raise _BadRequest(f"op {op!r} {takes}; got {unknown[0][:40]!r}")
    if op in ("add", "remove"):
        if "n" not in data:
            raise _BadRequest(f"op {op!r} needs n, the number of workers")
        _count(data["n"], op)
    if op == "stop" and not isinstance(data.setdefault("graceful", False), bool):
        raise _BadRequest(f"stop: graceful must be true or false, got {json.dumps(data['graceful'])}")
    return op, data


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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
                    self._publish(temp, path)
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

    def _publish(self, temp: Path, path: Path) -> None:
        """Put the socket ``temp`` in place as ``path``, unless a live pool has it."""
        for _ in range(5):
            try:
                os.link(temp, path)  # atomic, and fails if the name exists: never replaces a live socket
                return
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # a file system without hard links: rename, after the same check (a tiny race)
                found = _probe(path, PROBE_TIMEOUT)
                self._refuse_if_taken(path, found)
                if found.state == "stale":
                    _unlink_if(path, found.ident)
                os.rename(temp, path)
                return
            found = _probe(path, PROBE_TIMEOUT)
            self._refuse_if_taken(path, found)
            if found.state == "stale" and _unlink_if(path, found.ident):
                log.info("pool %r: removed a stale control socket %s (its pool had died)", self.name, path)
        raise ConfigError(
            f"pool {self.name!r}: cannot claim the control socket {path}: it keeps reappearing "
            "(is another pool of that name starting right now?)"
        )

    def _refuse_if_taken(self, path: Path, found: _Probe) -> None:
        if found.state == "not-socket":
            raise ConfigError(f"pool {self.name!r}: {path} exists and is not a socket; remove it")
        if found.state in ("live", "busy"):
            holder = f"process {found.pid}" if found.pid else "a live process"
            if found.pid == os.getpid():
                holder = f"this process ({found.pid})"
            raise NameTaken(
                f"pool name {self.name!r} is taken: {holder} runs a pool of that name (control socket {path}); "
                f"stop it (prefork ctl {self.name} stop) or give this pool another name"
            )

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
                thread.join(timeout)
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
            answer, after = self._answer(line.rstrip(b"\r"), client)
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

    # -- the operations -----------------------------------------------------------------------

    def _answer(self, line: bytes, client: _Client) -> tuple[bytes, Callable[[], None] | None]:
        """One answer line for one request line, and what to do once it is sent."""
        try:
            op, fields = _parse_request(line)
            body, after = getattr(self, f"_op_{op}")(**fields)
        except _BadRequest as exc:
            return _error(str(exc)), None
        except Exception as exc:
            log.exception("pool %r: control request %r failed", self.name, line[:200])
            return _error(f"internal error: {exc!r}"), None
        if op != "status":
            log.info("pool %r: %s (asked over the control socket by pid %d, uid %d)", self.name, body.get("message"), client.pid, client.uid)
        try:
            return _encode({"v": PROTOCOL_VERSION, "ok": True, "op": op, "pool": self.name, **body}), after
        except (TypeError, ValueError) as exc:
            return _error(f"internal error: the answer is not JSON: {exc}"), after

    def _check_changeable(self) -> None:
        pool = self.pool
        if pool.stopped:
            raise _BadRequest("the pool has stopped")
        if pool.broken is not None:
            raise _BadRequest(f"the pool is broken ({pool.broken}); it takes no changes")
        if pool.closing:
            raise _BadRequest("the pool is stopping; it takes no changes")

    def _op_status(self) -> tuple[dict[str, Any], None]:
        return {"status": self.pool.status()}, None

    def _resize(self, delta: int) -> tuple[dict[str, Any], None]:
        self._check_changeable()
        before = dict(self.pool.status()["policy"])
        try:
            self.pool.resize(delta)
        except (TypeError, ValueError) as exc:
            raise _BadRequest(str(exc)) from None
        after = dict(self.pool.status()["policy"])
        policy = after.get("name", "?")
        changes = {k: [before.get(k), v] for k, v in after.items() if k not in ("name", "max_workers") and before.get(k) != v}
        if changes:
            text = ", ".join(f"{k} {old} → {new}" for k, (old, new) in changes.items())
            message = f"pool {self.name!r}: {text} ({policy})"
        else:
            message = f"pool {self.name!r}: nothing changed ({policy} policy: already at its bound)"
        return {"message": message, "changes": changes, "policy": after}, None

    def _op_add(self, n: int) -> tuple[dict[str, Any], None]:
        return self._resize(n)

    def _op_remove(self, n: int) -> tuple[dict[str, Any], None]:
        return self._resize(-n)

    def _op_reload(self) -> tuple[dict[str, Any], None]:
        self._check_changeable()
        workers = sum(1 for w in self.pool.status()["workers"] if w.get("state") != "stopping")
        self.pool.retire_all("reload")
        message = f"pool {self.name!r}: reload: {_plural(workers, 'worker')} will be replaced once idle"
        return {"message": message, "workers": workers}, None

    def _op_stop(self, graceful: bool) -> tuple[dict[str, Any], Callable[[], None]]:
        pool = self.pool
        if pool.stopped:
            raise _BadRequest("the pool has stopped already")
        totals = pool.status()["totals"]
        if graceful:
            message = f"pool {self.name!r}: stopping (graceful: queued and running tasks finish)"
            return {"message": message, "graceful": True}, lambda: pool.shutdown(wait=False)
        grace = float(pool.config.pool.kill_grace)
        queued = int(totals.get("queued", 0))
        running = int(totals.get("busy", 0))
        them = "its worker is" if running == 1 else "their workers are"
        message = (
            f"pool {self.name!r}: stopping: {_plural(queued, 'queued task')} cancelled; "
            f"{_plural(running, 'running task')} {'has' if running == 1 else 'have'} {grace:g} s "
            f"(pool.kill_grace) to finish, then {them} killed"
        )
        return {"message": message, "graceful": False, "cancelled": queued, "kill_grace": grace}, lambda: self._stop_now(grace)

    def _stop_now(self, grace: float) -> None:
        """As ``prefork run`` on SIGTERM: cancel the queue, give running tasks ``grace`` s, then kill."""
        pool = self.pool
        pool.shutdown(wait=False, cancel_futures=True)

        def kill() -> None:
            if not pool.stopped:
                pool.shutdown(wait=False, force=True)

        if grace <= 0:
            kill()
            return
        timer = threading.Timer(grace, kill)
        timer.daemon = True
        timer.name = f"{self.name}-kill-grace"
        timer.start()


# -- the client side ------------------------------------------------------------------------


class PoolSocket(NamedTuple):
    """A running pool found by :func:`list_pools`."""

    name: str
    path: Path
    pid: int | None  #: the pool's process (``None`` if it could not be told)


def _scan(directory: str | os.PathLike[str] | None) -> tuple[Path, list[PoolSocket], list[Path]]:
    """The directory, its live pools and its stale sockets (none if the directory is missing)."""
    base = Path(directory) if directory is not None else default_directory()
    try:
        base = control_directory(base)
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return base, [], []
    live: list[PoolSocket] = []
    stale: list[Path] = []
    for entry in names:
        name, dot, ext = entry.rpartition(".")
        if not dot or ext != "sock" or entry.startswith(".") or not _NAME.fullmatch(name):
            continue
        found = _probe(base / entry, PROBE_TIMEOUT)
        if found.state in ("live", "busy"):
            live.append(PoolSocket(name, base / entry, found.pid))
        elif found.state == "stale":
            stale.append(base / entry)
    return base, live, stale


def list_pools(directory: str | os.PathLike[str] | None = None) -> list[PoolSocket]:
    """The pools whose control socket in ``directory`` (default: ``default_directory()``)
    answers, by name.  Sockets their dead pools left are not listed."""
    return _scan(directory)[1]


def _no_pool(name: str, directory: str | os.PathLike[str] | None, path: Path) -> ConfigError:
    try:
        live = [p.name for p in list_pools(directory)]
    except ConfigError:
        live = []
    running = f"; running: {', '.join(live)}" if live else "; no pool is running there"
    return ConfigError(f"no pool named {name!r} is running (no control socket {path}){running}")


def _read_line(sock: socket.socket, deadline: float, name: str, timeout: float) -> bytes:
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConfigError(f"pool {name!r} did not answer within {timeout:g} s")
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            raise ConfigError(f"pool {name!r} did not answer within {timeout:g} s") from None
        except ConnectionResetError:
            data = b""
        if not data:
            if buf:
                raise ConfigError(f"pool {name!r} closed the connection in the middle of its answer")
            raise ConfigError(f"pool {name!r} closed the connection without answering (is it stopping?)")
        end = data.find(b"\n")
        if end >= 0:
            buf += data[:end]
            return bytes(buf)
        buf += data
        if len(buf) > MAX_RESPONSE:
            raise ConfigError(f"pool {name!r} answered more than {MAX_RESPONSE} bytes without a newline")


def _connect(sock: socket.socket, path: Path, deadline: float) -> None:
    """Connect by ``deadline``.  A listener whose backlog is full makes a Unix socket's connect
    fail at once (EAGAIN) rather than wait: try again, a little later each time."""
    pause = 0.001
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        try:
            sock.connect(os.fspath(path))
            return
        except BlockingIOError:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)


def request(
    name: str,
    op: str,
    *,
    directory: str | os.PathLike[str] | None = None,
    timeout: float = CLIENT_TIMEOUT,
    **fields: Any,
) -> dict[str, Any]:
    """Send one request to the pool ``name`` and return its answer (``{"v": 1, "ok": true, ...}``).

    ``fields`` go into the request (``n=2`` for ``add``/``remove``,
    ``graceful=True`` for ``stop``).  Every failure a user can meet (no such
    pool, a stale socket, permission, no answer in ``timeout`` seconds, a
    request the pool refuses) raises ``ConfigError`` with one line naming the pool.
    """
    for key in ("v", "op"):
        if key in fields:
            raise TypeError(f"request(): {key!r} is set by request itself")
    path = socket_path(name, directory)
    try:
        control_directory(path.parent)
    except FileNotFoundError:
        raise ConfigError(f"no pool named {name!r} is running (no control directory {path.parent})") from None
    line = (json.dumps({"v": PROTOCOL_VERSION, "op": op, **fields}, separators=(",", ":")) + "\n").encode()
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            _connect(sock, path, deadline)
        except FileNotFoundError:
            raise _no_pool(name, directory, path) from None
        except ConnectionRefusedError:
            raise ConfigError(
                f"pool {name!r} is not running: its control socket {path} is stale (the process that made it "
                f"died; the next pool named {name!r} replaces it)"
            ) from None
        except PermissionError:
            try:
                owner = f" (it belongs to uid {os.stat(path).st_uid}: run this as that user)"
            except OSError:
                owner = ""
            raise ConfigError(f"cannot reach pool {name!r}: permission denied on {path}{owner}") from None
        except TimeoutError:
            raise ConfigError(f"pool {name!r} did not accept a connection within {timeout:g} s (it is very busy)") from None
        try:
            sock.sendall(line, _SEND_FLAGS)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered (a refusal) and closed before reading: the answer tells why
        except TimeoutError:
            raise ConfigError(f"pool {name!r} did not read the request within {timeout:g} s") from None
        raw = _read_line(sock, deadline, name, timeout)
    try:
        answer = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ConfigError(f"pool {name!r} answered something that is not JSON: {raw[:80]!r}") from None
    if not isinstance(answer, dict):
        raise ConfigError(f"pool {name!r} answered a JSON {type(answer).__name__}, not an object")
    if answer.get("v") != PROTOCOL_VERSION:
        raise ConfigError(
            f"pool {name!r} answered in protocol version {answer.get('v')!r}; this prefork speaks {PROTOCOL_VERSION}"
        )
    if answer.get("ok") is not True:
        raise ConfigError(f"pool {name!r}: {answer.get('error') or 'refused, and said not why'}")
    return answer


def fetch_status(
    name: str, *, directory: str | os.PathLike[str] | None = None, timeout: float = CLIENT_TIMEOUT
) -> dict[str, Any]:
    """The status snapshot of the pool ``name`` (as ``Supervisor.status()`` gives it in its process)."""
    status = request(name, "status", directory=directory, timeout=timeout).get("status")
    if not isinstance(status, dict):
        raise ConfigError(f"pool {name!r} answered a status request without a status")
    return status
