"""The exceptions prefork raises, as one small tree.

``PreforkError`` is the root.  Errors about a task's outcome also subclass the
standard exception a ``concurrent.futures`` user already catches:
``WorkerLost`` and ``PoolBroken`` are ``BrokenProcessPool``, ``TaskTimeout`` is
``TimeoutError``.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "ConfigError",
    "CorruptStream",
    "FrameTooLarge",
    "MethodNotFound",
    "MissingExtra",
    "OptionError",
    "PluginError",
    "PoolBroken",
    "PoolShutDown",
    "PreforkError",
    "QueueFull",
    "RemoteTaskError",
    "TaskTimeout",
    "WorkerLost",
    "describe_status",
    "error_text",
]


class PreforkError(Exception):
    """Root of every error prefork raises itself."""


class ConfigError(PreforkError, ValueError):
    """A configuration value is wrong; the message names file, key, value and reason.

    ``option`` is the strategy's :class:`OptionError` when one caused it.
    """

    option: OptionError | None = None


class OptionError(PreforkError, ValueError):
    """Raised by a strategy's validators: which option, what value, why.

    The config loader turns it into a :class:`ConfigError` that also names the
    file and the section.
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"{key} = {value!r}: {reason}")
        self.key = key
        self.value = value
        self.reason = reason

    def __reduce__(self) -> tuple[type[OptionError], tuple[str, object, str]]:
        return (type(self), (self.key, self.value, self.reason))


class PluginError(PreforkError):
    """A plugin could not be loaded, or registered something invalid."""


class MethodNotFound(PreforkError, LookupError):
    """No resolver knows the method a request names."""


class RemoteTaskError(PreforkError):
    """A task raised an exception that could not be rebuilt in the caller.

    ``type_name`` is the remote exception's qualified class name and
    ``remote_traceback`` the traceback text as the worker formatted it.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[RemoteTaskError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


def error_text(exc: BaseException) -> str:
    """An exception's message with its notes (PEP 678), where prefork says what it
    was doing; the class name when there is no message."""
    text = str(exc) or type(exc).__name__
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list) and notes:
        text = "\n".join([text, *(str(note) for note in notes)])
    return text


def _decode(status: int) -> tuple[int | None, str | None]:
    """A ``waitpid`` status as (exit code, None) or (None, signal name); (None, None)
    for a status that is neither (a stopped process's)."""
    try:
        code = os.waitstatus_to_exitcode(status)
    except (ValueError, OverflowError):
        return None, None
    if code >= 0:
        return code, None
    try:
        return None, signal.Signals(-code).name
    except ValueError:
        return None, f"signal {-code}"


def describe_status(status: int | None) -> str:
    """Word a ``waitpid`` status: ``exit code 3``, ``killed by SIGKILL``."""
    if status is None:
        return "unknown exit status"
    code, signal_name = _decode(status)
    if signal_name is not None:
        return f"killed by {signal_name}"
    if code is not None:
        return f"exit code {code}"
    return f"unknown exit status (wait status {status:#x})"


_HINTS = {
    "SIGKILL": "killed, possibly out of memory (or by a timeout or another process)",
    "SIGSEGV": "the worker crashed in native code (segmentation fault)",
    "SIGABRT": "the worker aborted (an assertion in native code, or abort())",
    "SIGBUS": "the worker crashed in native code (bus error)",
}


class WorkerLost(PreforkError, BrokenProcessPool):
    """The worker that held this task died before returning its result."""

    def __init__(self, pid: int, status: int | None, started: bool, detail: str = "") -> None:
        self.pid = pid
        self.status = status
        self.started = started
        how = describe_status(status)
        self.exitcode: int | None = None
        self.signal_name: str | None = None
        if status is not None:
            self.exitcode, self.signal_name = _decode(status)
        self.hint = _HINTS.get(self.signal_name or "", "")
        self.detail = detail
        where = "while running the task" if started else "before the task started"
        text = f"worker {pid} died {where} ({how})"
        if self.hint:
            text += f": {self.hint}"
        if detail:
            text += f"; {detail}"
        super().__init__(text)

    def __reduce__(self) -> tuple[type[WorkerLost], tuple[int, int | None, bool, str]]:
        return (type(self), (self.pid, self.status, self.started, self.detail))


class PoolBroken(PreforkError, BrokenProcessPool):
    """The pool cannot run tasks any more (workers fail to boot, again and again)."""


class PoolShutDown(PreforkError, RuntimeError):
    """The pool was shut down; no new task is accepted."""


class QueueFull(PreforkError):
    """``add_work`` found ``max_pending`` jobs outstanding and ``when_full = "raise"``."""


class FrameTooLarge(PreforkError, ValueError):
    """A frame is larger than the transport's ``max_frame``."""


class CorruptStream(PreforkError, ConnectionError):
    """The bytes on a channel are not frames: someone else wrote into the socket."""


class TaskTimeout(PreforkError, TimeoutError):
    """The task ran past its timeout; its worker was killed and replaced."""

    def __init__(self, timeout: float, pid: int, stack: str = "") -> None:
        text = f"task timed out after {timeout:g} s; worker {pid} was killed and replaced"
        if stack:
            text += "\nstack of the stuck worker:\n" + stack
        super().__init__(text)
        self.timeout = timeout
        self.pid = pid
        self.stack = stack

    def __reduce__(self) -> tuple[type[TaskTimeout], tuple[float, int, str]]:
        return (type(self), (self.timeout, self.pid, self.stack))


class MissingExtra(PreforkError, ImportError):
    """A feature needs an optional extra that is not installed; the message says
    which: ``pip install 'prefork[NAME]'`` (``progress``, ``metrics``, ``simulate``)."""
