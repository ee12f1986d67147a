"""The client side of the control socket (``prefork.control``): what ``prefork status``
and ``prefork ctl`` use.

:func:`request` sends one request line to a pool by name and returns its answer,
:func:`fetch_status` asks for its status snapshot, :func:`list_pools` finds the
pools whose socket answers in a directory.  Every failure a user can meet is a
``ConfigError`` of one line naming the pool.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Final, NamedTuple

from prefork._control_paths import _NAME, PROBE_TIMEOUT, _probe, control_directory, default_directory, socket_path
from prefork._control_protocol import _SEND_FLAGS, PROTOCOL_VERSION
from prefork.errors import ConfigError

MAX_RESPONSE: Final = 64 * 1024 * 1024  #: bytes a client reads at most (a status of 4096 workers is ~1 MB)
CLIENT_TIMEOUT: Final = 5.0  #: seconds ``request`` waits for the pool by default


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
