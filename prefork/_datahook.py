"""The MPM facade's data hook (``prefork.mpm``): how data its children send reaches
``child_data_hook``.

::

    child: yell(data) / exit(code, data) ──▶ its channel ──▶ supervisor: prefork_child_data
                                                              │  (_DataForwarder)
           data_hook_in_main = true:  child_data_hook(pid, data, exitcode), in the main process
           data_hook_in_main = false: ──▶ socket pair, length-prefixed cloudpickle frames ──▶
                                          _DataHookProcess: child_data_hook(pid, data, exitcode)

The data-hook process is forked when the pool starts; ``close`` ends its input,
lets it run the hook on what is left, and reaps it (SIGTERM, then SIGKILL, if
the hook does not finish in time).  It logs as ``prefork.mpm``.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from prefork import _logging
from prefork._hooks import hookimpl
from prefork._proctitle import set_title
from prefork._task import WorkerInfo
from prefork._worker import reset_signals

_LEN = struct.Struct("<Q")

log = logging.getLogger("prefork.mpm")


class _DataHookProcess:
    """A dedicated process running ``child_data_hook`` (``data_hook_in_main = false``)."""

    def __init__(self, hook: Callable[..., Any], name: str) -> None:
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            parent.close()
            code = 0
            try:
                reset_signals()
                _logging.set_role("data-hook")
                set_title(f"{name} datahook")
                _serve_data_hook(child, hook)
            except BaseException:
                log.exception("the data-hook process %d of %s failed; child_data_hook gets no more data", os.getpid(), name)
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child.close()
        self.pid = pid
        self.sock = parent

    def send(self, pid: int, data: Any, exitcode: int | None) -> None:
        frame = cloudpickle.dumps((pid, data, exitcode))
        self.sock.sendall(_LEN.pack(len(frame)) + frame)

    def close(self, grace: float, kill_grace: float) -> None:
        """No more data: the process runs the hook on what is left, then exits.  A hook
        still busy after ``grace`` seconds gets SIGTERM, then SIGKILL ``kill_grace`` later."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_grace), (None, None)):
            if _reaped_within(self.pid, wait):
                return
            if sig is None:
                break
            log.warning("the data-hook process %d is still running child_data_hook after %g s; sending %s",
                        self.pid, wait, signal.Signals(sig).name)
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def _reaped_within(pid: int, timeout: float | None) -> bool:
    """Reap ``pid`` if it exits within ``timeout`` seconds (``None``: wait as long as it takes)."""
    if timeout is None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        return False
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    return True


def _serve_data_hook(sock: socket.socket, hook: Callable[..., Any]) -> None:
    stream = sock.makefile("rb")
    while True:
        head = stream.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        (size,) = _LEN.unpack(head)
        pid, data, exitcode = pickle.loads(stream.read(size))
        try:
            hook(pid, data, exitcode)
        except Exception:
            log.exception("child_data_hook %r failed on data from child %d; the data-hook process goes on", hook, pid)


class _DataForwarder:
    """The core's ``prefork_child_data`` hook, handing data to ``child_data_hook``."""

    def __init__(self, hook: Callable[..., Any], process: _DataHookProcess | None) -> None:
        self.hook = hook
        self.process = process

    @hookimpl
    def prefork_child_data(self, worker: WorkerInfo, data: Any, exitcode: int | None) -> None:
        if self.process is not None:
            self.process.send(worker.pid, data, exitcode)
        else:
            self.hook(worker.pid, data, exitcode)
