"""Zero-downtime upgrades of ``prefork serve``: a new master inherits the
listening socket, boots its children, says it is ready, and only then does the
old master drain and exit.  If the new one fails to boot, the old one keeps
serving and logs why.

The old master (on SIGUSR2, or ``prefork ctl NAME upgrade``) starts its
successor with :meth:`Successor.start`: the same command line it was started
with (``sys.orig_argv``, so new code on disk is what runs), in the same
directory, with two descriptors passed: the listening socket (``PREFORK_LISTEN_FD``)
and the write end of a pipe (``PREFORK_READY_FD``).  The new master takes the
socket with :func:`inherited_listener` instead of binding, and once its first
children are up calls :func:`announce_ready`: one line on the pipe.  The old
master looks at :meth:`Successor.state` on every pass of its loop: ``"ready"``
(drain and exit), ``"failed"`` (it exited, or closed the pipe, before it was
ready: keep serving), or ``"booting"``.  A successor that is not ready within
``boot_timeout`` is killed and counts as failed.

Connections never see a closed socket: the socket is one kernel object shared
by both masters' children until the old ones leave, and the kernel queues new
connections on it whoever accepts them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Final, Literal

from prefork.errors import ConfigError

log = logging.getLogger("prefork.serve")

LISTEN_FD: Final = "PREFORK_LISTEN_FD"
READY_FD: Final = "PREFORK_READY_FD"
PREDECESSOR: Final = "PREFORK_PREDECESSOR"

State = Literal["booting", "ready", "failed"]


class Successor:
    """A new master being started by this one (see the module text)."""

    def __init__(self, proc: subprocess.Popen[bytes], ready_r: int, deadline: float) -> None:
        self.proc = proc
        self._ready_r = ready_r
        self._deadline = deadline
        self._got = b""
        self.why = ""  #: why it failed ("" while booting or ready)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, listener: socket.socket, boot_timeout: float, argv: list[str] | None = None) -> Successor:
        """Start the new master: this process's command line again, with ``listener`` passed."""
        command = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        fd = listener.fileno()
        env = {**os.environ, LISTEN_FD: str(fd), READY_FD: str(ready_w), PREDECESSOR: str(os.getpid())}
        try:
            proc = subprocess.Popen(command, env=env, pass_fds=(fd, ready_w), cwd=os.getcwd())
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        log.info("upgrade: started a new master, pid %d (%s)", proc.pid, " ".join(command))
        return cls(proc, ready_r, time.monotonic() + boot_timeout)

    def fileno(self) -> int:
        """The pipe's read end: readable when the new master is ready or gone."""
        return self._ready_r

    def state(self) -> State:
        """Look (never blocks): ready, failed, or still booting."""
        if self.why:
            return "failed"
        if self._ready_r < 0:
            return "ready"
        try:
            data = os.read(self._ready_r, 64)
        except BlockingIOError:
            data = None
        if data:
            self._got += data
            if b"ready\n" in self._got:
                self._close_pipe()
                return "ready"
        code = self.proc.poll()
        if code is not None:
            return self._fail(f"it exited with {_describe(code)} before it was ready")
        if data == b"":  # the end of the pipe, no "ready": it gave up on it
            return self._fail("it closed its ready pipe before it was ready")
        if time.monotonic() > self._deadline:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            return self._fail("it was not ready within pool.boot_timeout; killed")
        return "booting"

    def _fail(self, why: str) -> State:
        self.why = why
        self._close_pipe()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # alive but not ready: nothing of it may linger
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return "failed"

    def _close_pipe(self) -> None:
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1


def _describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def inherited_listener() -> socket.socket | None:
    """The listening socket an old master passed (``None``: this master was not started by
    an upgrade); the variable is removed so that children and later upgrades do not see it."""
    raw = os.environ.pop(LISTEN_FD, None)
    if raw is None:
        return None
    try:
        fd = int(raw)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{LISTEN_FD}={raw!r}: not a socket this process holds ({exc})") from None
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError(f"{LISTEN_FD}={raw!r}: fd {fd} is not a listening socket")
    os.set_inheritable(fd, False)
    return sock


def ready_fd() -> int:
    """The pipe to tell the old master on (-1: this master was not started by an upgrade);
    taken out of the environment.  Give it to the pool as a descriptor its workers close."""
    raw = os.environ.pop(READY_FD, None)
    os.environ.pop(PREDECESSOR, None)
    if raw is None:
        return -1
    try:
        fd = int(raw)
        os.set_inheritable(fd, False)
    except (ValueError, OSError) as exc:
        log.warning("upgrade: %s=%r is no pipe of ours (%s); the old master will time out waiting", READY_FD, raw, exc)
        return -1
    return fd


def announce_ready(fd: int) -> bool:
    """Tell the old master, on ``fd`` (from :func:`ready_fd`), that this one is ready: its
    children are up.  False if there was nobody to tell."""
    if fd < 0:
        return False
    try:
        os.write(fd, b"ready\n")
    except OSError as exc:
        log.warning("upgrade: could not tell the old master this one is ready: %s", exc)
        return False
    finally:
        os.close(fd)
    return True


__all__ = ["LISTEN_FD", "PREDECESSOR", "READY_FD", "Successor", "announce_ready", "inherited_listener", "ready_fd"]
