"""systemd's two small protocols, spoken by ``prefork serve`` itself: no python-systemd.

::

    systemd                                   prefork serve (the supervisor)
    ───────                                   ──────────────────────────────
    .socket unit binds ListenStream= ──fd 3──► listen_fds(): LISTEN_PID is us, LISTEN_FDS
      LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES     sockets from fd 3, each a listening stream
                                                 socket, close-on-exec; the variables unset
    Type=notify: $NOTIFY_SOCKET  ◄──datagram── notify("READY=1\\nSTATUS=...")
      (a path, or @name: abstract)               Announcer.step(): what the loop saw, as
                                                 READY=1 / RELOADING=1 / STATUS= / WATCHDOG=1;
                                                 Announcer.stopping(): STOPPING=1;
                                                 Announcer.hand_over(): MAINPID= (upgrade)
    WatchdogSec=: WATCHDOG_USEC, WATCHDOG_PID  watchdog_interval(): how often to ping

sd_listen_fds(3): the sockets start at fd ``SD_LISTEN_FDS_START`` = 3, in the order
of the socket unit; ``LISTEN_PID`` says which process they are for, so a process
that did not ``exec`` in between (a wrapper shell) cannot take them by mistake.
sd_notify(3): each message is one datagram of ``KEY=value`` lines.

The children of ``prefork serve`` are forked, never exec'd: the close-on-exec flag
that :func:`listen_fds` sets keeps the sockets from programs the app runs, and the
children still accept on them.  Everything here logs under ``prefork.serve``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import os
import resource
import socket
import stat
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, NamedTuple, final

from prefork.errors import ConfigError

if TYPE_CHECKING:
    from prefork.config import Config

__all__ = [
    "LISTEN_FDS_START", "WATCHDOG_MESSAGE", "Announcer", "Seen", "activated_listener", "describe", "listen_fds",
    "listen_fds_with_names", "notify", "ready_message", "reloading_message", "status_message", "stopping_message",
    "watchdog_interval",
]

log = logging.getLogger("prefork.serve")

LISTEN_FDS_START: Final = 3  #: sd_listen_fds(3)'s SD_LISTEN_FDS_START
#: what sd_listen_fds() reads, and unsets with unset_environment
_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: seconds a notification may wait for room in the receiver's queue; systemd's is
#: large (it reads at once), so only a stuck receiver makes the supervisor wait this long
SEND_TIMEOUT: Final = 1.0
#: seconds between two STATUS= updates of the children's counts (``systemctl status``)
STATUS_EVERY: Final = 2.0
_UNNAMED: Final = "unknown"  # the name systemd gives a passed fd when the unit names none

# -- socket activation: sd_listen_fds(3) -------------------------------------------------------


class _ListenEnv(NamedTuple):
    sockets: int  # passed to this process (0: none)
    names: list[str]
    note: str  # why variables that were set are not for this process ("": nothing to say)


def _decimal(name: str, value: str, what: str) -> int:
    """``value`` as a positive decimal number (ASCII digits only, at most 10 of them), else ConfigError."""
    if not (value.isascii() and value.isdigit()):
        raise ConfigError(f"{name}={value!r}: not {what} (decimal digits expected)")
    if len(value) > 10:
        raise ConfigError(f"{name}={value[:20]}...: too large for {what}")
    if int(value) == 0:
        raise ConfigError(f"{name}={value!r}: not {what} (0; systemd never sets it to 0)")
    return int(value)


def _parse_listen_env(env: Mapping[str, str], pid: int, fd_limit: int) -> _ListenEnv:
    """What the socket-activation variables in ``env`` say to process ``pid``, which may
    have at most ``fd_limit`` descriptors open.  Touches no descriptor; a malformed
    value is a ConfigError naming the variable, its value and why."""
    listen_pid = env.get("LISTEN_PID")
    listen_fds = env.get("LISTEN_FDS")
    if listen_pid is None:
        if listen_fds is None:
            return _ListenEnv(0, [], "")
        return _ListenEnv(0, [], f"LISTEN_FDS={listen_fds!r} is set without LISTEN_PID, which systemd always sets "
                                 "with it: not for this process; the sockets are not used")
    owner = _decimal("LISTEN_PID", listen_pid, "a process id")
    if owner != pid:
        return _ListenEnv(0, [], f"LISTEN_PID={owner} is not this process (pid {pid}): the sockets systemd passed "
                                 "are for another process (does a wrapper between systemd and prefork serve run it "
                                 "without exec?); they are not used")
    if listen_fds is None:
        return _ListenEnv(0, [], f"LISTEN_PID={owner} names this process but LISTEN_FDS is not set: no sockets")
    count = _decimal("LISTEN_FDS", listen_fds, "a count of sockets")
    if count > fd_limit - LISTEN_FDS_START:
        raise ConfigError(f"LISTEN_FDS={count}: more sockets than this process may have open "
                          f"(fds {LISTEN_FDS_START}.. under RLIMIT_NOFILE = {fd_limit})")
    raw_names = env.get("LISTEN_FDNAMES")
    if raw_names is None:
        return _ListenEnv(count, [_UNNAMED] * count, "")
    names = raw_names.split(":")
    if len(names) != count:
        raise ConfigError(f"LISTEN_FDNAMES={raw_names!r} names {len(names)} socket(s), LISTEN_FDS={count}: "
                          "one name per socket expected")
    return _ListenEnv(count, names, "")


_FILE_KINDS: Final = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe (FIFO)"),
                      (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_TYPE_NAMES: Final[dict[int, str]] = {
    int(socket.SOCK_DGRAM): "a datagram socket (SOCK_DGRAM)", int(socket.SOCK_SEQPACKET): "a SOCK_SEQPACKET socket",
    int(socket.SOCK_RAW): "a raw socket (SOCK_RAW)",
}


def _label(fd: int, name: str) -> str:
    return f"fd {fd}" if name == _UNNAMED else f"fd {fd} ({name!r})"


def _take(fd: int, name: str) -> socket.socket:
    """A socket object on passed ``fd``, if it is a listening stream socket; else ConfigError."""
    need = "a listening stream socket is needed (ListenStream= in the .socket unit)"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ConfigError(f"LISTEN_FDS: {_label(fd, name)} is not open ({exc.strerror}); {need}") from None
    if not stat.S_ISSOCK(mode):
        kind = next((text for test, text in _FILE_KINDS if test(mode)), f"not a socket (mode {mode:o})")
        raise ConfigError(f"LISTEN_FDS: {_label(fd, name)} is {kind}, not a socket; {need}")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"LISTEN_FDS: {_label(fd, name)} is a socket Python cannot use ({exc}); {need}") from None
    try:
        sock_type = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if sock_type != socket.SOCK_STREAM:
            what = _TYPE_NAMES.get(sock_type, f"a socket of type {sock_type}")
            raise ConfigError(f"LISTEN_FDS: {_label(fd, name)} is {what} on {describe(sock)}; {need}")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            try:
                peer = f"connected to {_address(sock.family, sock.getpeername())}"
            except OSError:
                peer = f"bound to {describe(sock)}" if _bound(sock) else "neither bound nor connected"
            raise ConfigError(f"LISTEN_FDS: {_label(fd, name)} is a stream socket that is not listening ({peer}); "
                              f"{need}")
    except BaseException:
        sock.detach()  # the fd stays as it was passed: not ours to close
        raise
    return sock


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, with their names (``FileDescriptorName=``,
    else the socket unit's name; ``"unknown"`` when ``LISTEN_FDNAMES`` is not set).

    ``[]`` when none were passed.  Variables that are set but name another process
    are logged (WARNING) and not used.  A malformed variable, or a passed fd that is
    not a listening stream socket, is a :class:`~prefork.errors.ConfigError` in one
    line naming it.  Each fd is made close-on-exec.  With ``unset_environment`` the
    three variables are removed from ``os.environ`` whatever the outcome, so neither
    the children nor the programs they run see them."""
    try:
        parsed = _parse_listen_env(os.environ, os.getpid(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    finally:
        if unset_environment:
            for var in _LISTEN_VARS:
                os.environ.pop(var, None)
    if parsed.note:
        log.warning("%s", parsed.note)
    taken: list[tuple[str, socket.socket]] = []
    try:
        for offset, name in enumerate(parsed.names):
            taken.append((name, _take(LISTEN_FDS_START + offset, name)))
            taken[-1][1].set_inheritable(False)
    except BaseException:
        for _, sock in taken:
            sock.detach()  # the fds stay open, as passed: not ours to close
        raise
    return taken


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The sockets systemd passed, in the order of the socket unit; see :func:`listen_fds_with_names`."""
    return [sock for _, sock in listen_fds_with_names(unset_environment)]


def _bound(sock: socket.socket) -> bool:
    with contextlib.suppress(OSError):
        return sock.getsockname() not in ("", ("0.0.0.0", 0), ("::", 0, 0, 0))
    return False


def _address(family: int, name: object) -> str:
    if family == socket.AF_UNIX:
        if isinstance(name, bytes):
            name = name.decode(errors="backslashreplace")
        if not name:
            return "an unnamed unix socket"
        text = str(name)
        return "@" + text[1:] if text.startswith("\0") else text
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return str(name)


def describe(sock: socket.socket) -> str:
    """Where ``sock`` listens, for people: ``127.0.0.1:8000``, ``[::]:8000``, ``/run/app.sock``, ``@abstract``."""
    try:
        return _address(sock.family, sock.getsockname())
    except OSError as exc:
        return f"an unknown address ({exc.strerror})"


# -- using the passed socket in prefork serve ------------------------------------------------------


def _explicit(config: Config, key: str) -> str | None:
    """The layer that set ``key`` when the user did (a file, --set), ``None`` for a profile's or the default."""
    source = config.sources.get(key)
    return None if source is None or str(source).startswith("profile ") else str(source)


def _same_place(bind: str, sock: socket.socket) -> bool:
    """Whether ``bind`` ('host:port', as ``mpm.bind``) names the address ``sock`` listens on.
    Port 0 (any port) matches every port; an empty host, 0.0.0.0 and :: (every
    address) match one another; a host name matches any address it resolves to."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    host, _, port_text = bind.rpartition(":")
    host = host.strip("[]")
    there_host, there_port = sock.getsockname()[:2]
    if int(port_text) not in (0, there_port):
        return False
    there = ipaddress.ip_address(str(there_host).partition("%")[0])
    if host in ("", "0.0.0.0", "::"):
        return there.is_unspecified
    infos = []
    with contextlib.suppress(OSError):  # a name that does not resolve names no address
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return any(ipaddress.ip_address(str(info[4][0]).partition("%")[0]) == there for info in infos)


def activated_listener(config: Config) -> socket.socket | None:
    """The listening socket systemd passed to ``prefork serve`` (socket activation), or
    ``None``: then it binds ``mpm.bind`` itself.  Call it before anything is forked or
    the app is imported; it unsets ``LISTEN_*``.

    The passed socket wins over ``mpm.bind``: an ``mpm.bind`` the user set (in a file
    or with --set; the profile's default does not count) must name the same address,
    else ConfigError — two places saying different things is a mistake to fix, not
    to guess about.  An ``mpm.backlog`` the user set is applied to the passed socket
    (a second ``listen()``); otherwise the socket unit's ``Backlog=`` stays.  More than
    one passed socket is refused: ``prefork serve`` accepts on one."""
    passed = listen_fds_with_names()
    if not passed:
        return None
    if len(passed) > 1:
        where = ", ".join(f"{_label(LISTEN_FDS_START + i, name)} on {describe(sock)}"
                          for i, (name, sock) in enumerate(passed))
        for _, sock in passed:
            sock.detach()
        raise ConfigError(f"LISTEN_FDS={len(passed)}: systemd passed {len(passed)} sockets ({where}); prefork serve "
                          "accepts on one: give its .socket unit a single ListenStream=")
    name, sock = passed[0]
    here = describe(sock)
    source = _explicit(config, "mpm.bind")
    if source is not None and not _same_place(config.mpm.bind, sock):
        sock.detach()
        raise ConfigError(f"{source}: mpm.bind = {config.mpm.bind!r}, but systemd passed a socket listening on "
                          f"{here} ({_label(LISTEN_FDS_START, name)}), which prefork serve uses: remove mpm.bind "
                          "or make it name the same address")
    source = _explicit(config, "mpm.backlog")
    if source is not None:
        sock.listen(config.mpm.backlog)
        log.info("mpm.backlog = %d (%s) applied to the socket systemd passed", config.mpm.backlog, source)
    log.info("using the socket systemd passed: %s on %s", _label(LISTEN_FDS_START, name), here)
    return sock


# -- notifications: sd_notify(3) -------------------------------------------------------------------

_warned: set[tuple[str, str]] = set()  # (NOTIFY_SOCKET, why) already logged: once each


def _warn_once(where: str, why: str, text: str) -> None:
    if (where, why) not in _warned:
        _warned.add((where, why))
        log.warning("%s", text)


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to ``$NOTIFY_SOCKET`` as one datagram.

    ``False`` when there is no ``NOTIFY_SOCKET`` (not started by systemd as
    ``Type=notify``) or the message could not be sent; a failure is logged once per
    socket and kind of failure (WARNING), never raised.  The socket is an absolute
    path or ``@name`` (abstract namespace).  A receiver whose queue stays full holds
    the caller at most ``SEND_TIMEOUT`` seconds."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where:
        return False
    if where.startswith("@"):
        address: str | bytes = b"\0" + os.fsencode(where[1:])
    elif where.startswith("/"):
        address = os.fsencode(where)
    else:
        _warn_once(where, "address", f"NOTIFY_SOCKET={where!r}: not an absolute path or @name; "
                                     "systemd notifications are not sent")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)  # connected: a full receiver queue is waited for, not spun on
            sock.send(state.encode())
    except (OSError, ValueError) as exc:
        why = errno.errorcode.get(exc.errno or 0, "") if isinstance(exc, OSError) else ""
        first = (state.splitlines() or [""])[0]
        _warn_once(where, why or type(exc).__name__, f"NOTIFY_SOCKET={where!r}: cannot send {first!r}: {exc}; "
                                                     "systemd may not see this server's state")
        return False
    return True


def _line(key: str, text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(f"{key}= must be one line: {text!r}")
    return f"{key}={text}"


def _with_status(first: str, text: str) -> str:
    return f"{first}\n{_line('STATUS', text)}" if text else first


def ready_message(text: str = "", pid: int | None = None) -> str:
    """``READY=1``, the main pid (``MAINPID=``, this process by default) and ``STATUS=text``."""
    return _with_status(f"READY=1\nMAINPID={os.getpid() if pid is None else pid}", text)


def reloading_message(text: str = "", monotonic_usec: int | None = None) -> str:
    """``RELOADING=1`` with ``MONOTONIC_USEC=`` (now on CLOCK_MONOTONIC, by default): systemd 253+
    matches it with the reload it asked for (``Type=notify-reload``); older ones ignore it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 if monotonic_usec is None else monotonic_usec
    return _with_status(f"RELOADING=1\nMONOTONIC_USEC={usec}", text)


def stopping_message(text: str = "") -> str:
    """``STOPPING=1`` and ``STATUS=text``."""
    return _with_status("STOPPING=1", text)


def status_message(text: str) -> str:
    """``STATUS=text``: the one line ``systemctl status`` shows."""
    return _line("STATUS", text)


#: still alive: needed every :func:`watchdog_interval` seconds
WATCHDOG_MESSAGE: Final = "WATCHDOG=1"


def watchdog_interval(predecessor: int | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC`` (``WatchdogSec=``),
    as sd_watchdog_enabled(3) advises; ``None`` when no watchdog is asked of this
    process (unset, or ``$WATCHDOG_PID`` names another one, such as the supervisor
    seen from its forked children).  A ``WATCHDOG_PID`` naming ``predecessor`` (the
    master an upgrade replaces) is taken over: set to this process, for its own
    successor.  A malformed value is a ConfigError."""
    usec = os.environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    owner = os.environ.get("WATCHDOG_PID")
    if owner is not None:
        pid = _decimal("WATCHDOG_PID", owner, "a process id")
        if pid == predecessor:
            os.environ["WATCHDOG_PID"] = str(os.getpid())
        elif pid != os.getpid():
            return None
    return _decimal("WATCHDOG_USEC", usec, "a number of microseconds") / 2_000_000


# -- what prefork serve's loop tells systemd ----------------------------------------------------------


class Seen(NamedTuple):
    """What one pass of ``prefork serve``'s loop saw."""

    idle: int  #: children waiting for a connection
    busy: int  #: children handling one
    hangups: int  #: SIGHUPs taken so far (a running count: each one is a reload request)
    reloading: bool  #: a reload is under way, or wanted once the one under way is done


@final
class Announcer:
    """What ``prefork serve`` tells systemd, decided from what its loop sees; it sends
    nothing itself (the loop passes each message to :func:`notify`), so it is tested
    without a socket or a clock.

    - ``READY=1`` once a child is up (idle or busy) for the first time;
    - after that, each pass that took a SIGHUP: ``RELOADING=1`` (``MONOTONIC_USEC=``
      of that pass, so later than the signal: systemd's ``Type=notify-reload`` waits
      for exactly that), then ``READY=1`` once no reload is under way or wanted and
      a child is up;
    - ``STATUS=`` with the children's counts when they change, at most every
      ``status_every`` seconds;
    - ``WATCHDOG=1`` every ``watchdog`` seconds (:func:`watchdog_interval`), from the
      first pass on;
    - :meth:`stopping`: ``STOPPING=1``, once; :meth:`hand_over` (an upgrade): the new
      master's pid; nothing after either.

    A ``successor`` (the new master of an upgrade) is not systemd's main process
    until its predecessor hands over: it starts as ready, saying nothing, and
    pings and updates the status only one interval after its first pass."""

    __slots__ = ("_address", "_hangups", "_next_ping", "_phase", "_said", "_said_at", "_status_every",
                 "_successor", "_watchdog")

    def __init__(self, address: str, watchdog: float | None, status_every: float = STATUS_EVERY,
                 successor: bool = False) -> None:
        if watchdog is not None and not watchdog > 0:
            raise ValueError(f"watchdog = {watchdog!r}: seconds > 0 expected")
        self._address, self._watchdog, self._status_every, self._successor = address, watchdog, status_every, successor
        self._phase = "ready" if successor else "starting"  # -> "ready" <-> "reloading"; any -> "stopped"
        self._hangups = 0
        self._next_ping = -1.0  # monotonic seconds of the next WATCHDOG=1 (-1: set at the first pass)
        self._said = ""  # the last STATUS= text sent, and when
        self._said_at = -math.inf

    @property
    def phase(self) -> str:
        return self._phase

    def serving(self, seen: Seen) -> str:
        return f"serving on {self._address}: {seen.idle} idle, {seen.busy} busy children"

    def step(self, now_ns: int, seen: Seen) -> list[str]:
        """The messages for this pass; ``now_ns`` is ``time.monotonic_ns()`` (CLOCK_MONOTONIC on Linux)."""
        if self._phase == "stopped":
            return []
        now = now_ns / 1e9
        if self._next_ping < 0:  # the first pass
            self._next_ping = now + self._watchdog if self._successor and self._watchdog else now
            self._said_at = now if self._successor else -math.inf
        out: list[str] = []
        up = seen.idle + seen.busy > 0
        if self._phase == "starting":
            if up:
                out.append(self._status(ready_message(self.serving(seen)), self.serving(seen), now))
                self._phase = "ready"
                self._hangups = seen.hangups  # a SIGHUP during the start asked systemd nothing
        elif seen.hangups > self._hangups:
            self._hangups = seen.hangups
            text = "reloading: children replaced one at a time (SIGHUP)"
            out.append(self._status(reloading_message(text, now_ns // 1000), text, now))
            self._phase = "reloading"
        elif self._phase == "reloading":
            if up and not seen.reloading:
                out.append(self._status(ready_message(self.serving(seen)), self.serving(seen), now))
                self._phase = "ready"
        elif self.serving(seen) != self._said and now - self._said_at >= self._status_every:
            out.append(self._status(status_message(self.serving(seen)), self.serving(seen), now))
        if self._watchdog is not None and now >= self._next_ping:
            out.append(WATCHDOG_MESSAGE)
            self._next_ping = now + self._watchdog
        return out

    def _status(self, message: str, text: str, now: float) -> str:
        self._said, self._said_at = text, now
        return message

    def stopping(self, why: str) -> list[str]:
        """``STOPPING=1`` with ``STATUS=stopping: why``, the first time; ``[]`` after."""
        if self._phase == "stopped":
            return []
        self._phase = "stopped"
        return [stopping_message(f"stopping: {why}")]

    def hand_over(self, pid: int) -> list[str]:
        """An upgrade is done: the new master ``pid`` is systemd's main process from now on
        (``READY=1`` with ``MAINPID=pid``); this one drains and exits without a ``STOPPING=1``."""
        if self._phase == "stopped":
            return []
        self._phase = "stopped"
        return [ready_message(f"upgraded: the new master (pid {pid}) serves; pid {os.getpid()} drains", pid)]

    def timeout(self, now_ns: int, longest: float) -> float:
        """How long the loop may wait before its next pass: ``longest``, or less when a ping is due sooner."""
        if self._watchdog is None or self._phase == "stopped":
            return longest
        return max(0.0, min(longest, self._next_ping - now_ns / 1e9))
