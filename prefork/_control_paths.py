"""Where control sockets live, and who is at the other end of one (``prefork.control``).

The names a socket may have, the directory that holds them and its safety
checks, the socket's path; the peer's credentials (``SO_PEERCRED``); the probe
that tells a live pool's socket from one its dead pool left behind; and how a
server puts its socket in place without ever replacing a live pool's.  The
server (:mod:`prefork.control`) and the client (:mod:`prefork._control_client`)
both use them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import struct
from pathlib import Path
from typing import Final, NamedTuple

from prefork.errors import ConfigError

log = logging.getLogger("prefork.control")

PROBE_TIMEOUT: Final = 1.0  #: seconds a start waits when it asks whether a socket's pool is alive
SUN_PATH_MAX: Final = 107  #: bytes of a Unix socket path (sun_path is 108 with its NUL)
NAME_MAX: Final = 64

_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TEMP_PREFIX: Final = ".tmp-"
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid


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


class _Probe(NamedTuple):
    state: str  #: live | busy | stale | missing | not-socket
    pid: int | None = None
    ident: tuple[int, int] | None = None  #: (st_dev, st_ino) of the file probed


class NameTaken(ConfigError):
    """A live pool holds the control socket of this name."""


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


# -- putting a socket in place -----------------------------------------------------------------


def _publish(temp: Path, path: Path, name: str) -> None:
    """Put the socket ``temp`` of the pool ``name`` in place as ``path``, unless a live pool has it."""
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
            _refuse_if_taken(path, found, name)
            if found.state == "stale":
                _unlink_if(path, found.ident)
            os.rename(temp, path)
            return
        found = _probe(path, PROBE_TIMEOUT)
        _refuse_if_taken(path, found, name)
        if found.state == "stale" and _unlink_if(path, found.ident):
            log.info("pool %r: removed a stale control socket %s (its pool had died)", name, path)
    raise ConfigError(
        f"pool {name!r}: cannot claim the control socket {path}: it keeps reappearing "
        "(is another pool of that name starting right now?)"
    )


def _refuse_if_taken(path: Path, found: _Probe, name: str) -> None:
    if found.state == "not-socket":
        raise ConfigError(f"pool {name!r}: {path} exists and is not a socket; remove it")
    if found.state in ("live", "busy"):
        holder = f"process {found.pid}" if found.pid else "a live process"
        if found.pid == os.getpid():
            holder = f"this process ({found.pid})"
        raise NameTaken(
            f"pool name {name!r} is taken: {holder} runs a pool of that name (control socket {path}); "
            f"stop it (prefork ctl {name} stop) or give this pool another name"
        )
