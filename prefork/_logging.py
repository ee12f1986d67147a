"""Logging for every prefork process: named loggers, one handler, text or JSON lines.

Each part of prefork logs under its own name, in the process where it runs::

    prefork.supervisor   the loop: forks, deaths, timeouts, scaling      supervisor
    prefork.spawn        forking workers, the fork server                supervisor, fork-server
    prefork.worker       a worker's own failures (body, finalizer, hooks) worker
    prefork.sink         result sinks (a failing result callback)        supervisor
    prefork.mpm          the MPM facade's data-hook process               data-hook
    prefork.serve        ``prefork serve``: address, signals, connections supervisor, worker
    prefork.dispatcher   the Dispatcher and its XML-RPC front            supervisor
    prefork.progress     a progress bar that failed                      supervisor
    prefork.control      the control socket: actions asked, refusals      supervisor
    prefork.metrics      the Prometheus endpoint                          supervisor
    prefork.status_page  the status page                                  supervisor

:func:`configure` (``prefork run/serve --log-level LEVEL --log-format json``)
puts one handler on the root logger, so the application's own loggers come out
in the same format.  Workers are forked with it: logging re-creates handler
locks in a child, and a record carries the pid of the process that made it.
A process says what it is with :func:`set_role` (a worker does as it boots);
the JSON format names it.  Configure before starting a pool: its fork server
is forked at start, with the logging set up then, and forks every worker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, Final, TextIO

from prefork.errors import ConfigError

__all__ = ["FORMATS", "ROLES", "JsonFormatter", "TextFormatter", "configure", "parse_level", "role_of", "set_role"]

FORMATS: Final = ("text", "json")
ROLES: Final = frozenset({"supervisor", "worker", "fork-server", "data-hook"})
_NAMED_LEVELS: Final = "DEBUG, INFO, WARNING, ERROR, CRITICAL"

# -- the process's role ---------------------------------------------------------------------

#: (pid, role): the role holds only in the process that set it, never in a child forked from it
_role: tuple[int, str] = (0, "")


def set_role(role: str) -> None:
    """Name what this process is (``supervisor``, ``worker``, ``fork-server``, ``data-hook``);
    its forked children are unnamed until they say it themselves."""
    if role not in ROLES:
        raise ValueError(f"process role {role!r}: expected one of {', '.join(sorted(ROLES))}")
    global _role
    _role = (os.getpid(), role)


def role_of(pid: int) -> str | None:
    """The role ``pid`` set, if it is this process and it set one."""
    owner, role = _role
    return role if owner == pid else None


# -- formats ------------------------------------------------------------------------------------------


def _utc(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC, to the millisecond: ``2025-01-31T12:00:00.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER [PID] MESSAGE``; a traceback follows on its own lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc(record)


#: a record's own attributes; whatever else it has came from ``extra=`` (or a filter)
_RECORD_KEYS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}  # fmt: skip
#: the keys the JSON format writes itself; an extra field by one of these names gets ``extra_`` in front
JSON_KEYS: Final = ("time", "level", "logger", "pid", "role", "message", "exc_info", "stack_info")


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<{type(value).__qualname__}: repr() failed: {exc!r}>"


def _dumps(obj: Any) -> str:
    # ASCII escapes: a line survives any stream encoding (a lone surrogate would not); NaN is no JSON
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, default=_safe_repr)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``pid``,
    ``role`` (when the process set one), ``message``, ``exc_info`` and ``stack_info``
    (text, when present), then the caller's ``extra=`` fields.  An extra value JSON
    cannot hold (an object, a tuple key, NaN, a cycle) is written as its ``repr``."""

    def format(self, record: logging.LogRecord) -> str:
        pid = record.process if record.process is not None else os.getpid()
        out: dict[str, Any] = {"time": _utc(record), "level": record.levelname, "logger": record.name, "pid": pid}
        role = role_of(pid)
        if role is not None:
            out["role"] = role
        out["message"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        extra: dict[str, Any] = {}
        for key, value in vars(record).items():
            if key in _RECORD_KEYS:
                continue
            name = key
            while name in out or name in extra or name in JSON_KEYS:
                name = "extra_" + name
            extra[name] = value
        try:
            return _dumps(out | extra)
        except (TypeError, ValueError, RecursionError):  # a value json.dumps refuses after default=
            pass
        for name, value in extra.items():
            try:
                _dumps(value)
            except (TypeError, ValueError, RecursionError):
                extra[name] = _safe_repr(value)
        return _dumps(out | extra)


# -- set up ---------------------------------------------------------------------------------------------


def parse_level(level: str | int) -> int:
    """A level name (any case) or number that :mod:`logging` knows, as a number; else ConfigError."""
    known = logging.getLevelNamesMapping()
    if isinstance(level, str):
        value = known.get(level.strip().upper(), logging.NOTSET)
    elif isinstance(level, int) and not isinstance(level, bool) and level in known.values():
        value = level
    else:
        value = logging.NOTSET
    if value == logging.NOTSET:
        raise ConfigError(f"log level {level!r} is not a level; use one of {_NAMED_LEVELS}")
    return value


def _formatter(fmt: str) -> logging.Formatter:
    name = fmt.strip().lower() if isinstance(fmt, str) else None
    if name == "json":
        return JsonFormatter()
    if name == "text":
        return TextFormatter()
    raise ConfigError(f"log format {fmt!r} is not a format; use one of {', '.join(FORMATS)}")


_lock = threading.Lock()
_installed: logging.Handler | None = None


def configure(level: str | int, fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``level`` or above to ``stream`` (default: ``sys.stderr``
    now) in format ``fmt`` (``"text"`` or ``"json"``, in any case), from this process and every worker
    forked after this call.  The handler goes on the root logger, at the root logger's
    level; a second call replaces the first one's handler.  A bad level or format
    raises :class:`~prefork.errors.ConfigError` and changes nothing.  Returns the handler."""
    value = parse_level(level)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_formatter(fmt))
    global _installed
    root = logging.getLogger()
    with _lock:
        if _installed is not None:
            root.removeHandler(_installed)
            _installed.close()
        root.addHandler(handler)
        root.setLevel(value)
        _installed = handler
    return handler
