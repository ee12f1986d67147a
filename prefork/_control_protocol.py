"""The control protocol (``prefork.control``): one request line in, one answer line out,
and what each op does to the pool.

A request is a JSON object on one line, ``{"v": 1, "op": ..., <the op's fields>}``;
:func:`_parse_request` checks it and names what is wrong.  :class:`Operations`
carries out one op on a :class:`ControlledPool` (``status``, ``add``/``remove``
through ``resize``, ``reload`` through ``retire_all``, ``stop``) and words its
answer, ``{"v": 1, "ok": true, ...}`` or ``{"v": 1, "ok": false, "error": ...}``.
No sockets here: the server (:mod:`prefork.control`) reads and writes the lines.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from prefork._supervisor import Supervisor

log = logging.getLogger("prefork.control")

PROTOCOL_VERSION: Final = 1
#: the operations a request may name
OPS: Final = ("add", "reload", "remove", "status", "stop", "upgrade")
MAX_REQUEST: Final = 64 * 1024  #: bytes a request line may have (a real one has about 40)

_SEND_FLAGS: Final = getattr(socket, "MSG_NOSIGNAL", 0)


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

    #: ``prefork serve``'s zero-downtime upgrade (its answer); ``None`` in a pool that has none
    upgrader: Callable[[], str] | None

    def shutdown(self, wait: bool = True, cancel_futures: bool = False, force: bool = False) -> None: ...


if TYPE_CHECKING:

    def _supervisor_is_controllable(sup: Supervisor) -> ControlledPool:
        return sup  # mypy checks here that the Supervisor keeps this contract


class _BadRequest(Exception):
    """The request is wrong, or the pool cannot do it now: the message is the answer's ``error``."""


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


class Operations:
    """The ops of the control protocol on one pool: :meth:`answer` turns a request
    line from the peer ``pid``/``uid`` into an answer line and what to do once it
    is sent (a stop)."""

    def __init__(self, pool: ControlledPool, name: str) -> None:
        self.pool = pool
        self.name = name

    def answer(self, line: bytes, pid: int, uid: int) -> tuple[bytes, Callable[[], None] | None]:
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
            log.info("pool %r: %s (asked over the control socket by pid %d, uid %d)", self.name, body.get("message"), pid, uid)
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

    def _op_upgrade(self) -> tuple[dict[str, Any], None]:
        self._check_changeable()
        upgrader = self.pool.upgrader
        if upgrader is None:
            raise _BadRequest("this pool cannot upgrade itself: only `prefork serve` starts a new master "
                              "(use reload to replace the workers)")
        return {"message": f"pool {self.name!r}: {upgrader()}"}, None

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
