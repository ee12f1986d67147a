"""``prefork serve``: a preforking TCP server, the MPM facade driven by a loop of its own.

::

    serve(config)                                            children (the spare policy keeps
    ─────────────                                            min_spare..max_spare idle ones)
    bind mpm.bind ── listener, inherited by every child ──►  _serve_body: select(listener, channel)
    MPM.from_config(config), children run _serve_body         accept ─► busy() ─► app(conn, addr)
    loop:                                                      ─► idle() (leaves here when asked)
                                                             or, with mpm.wsgi, accept ─► the WSGI
                                                               handler (prefork._wsgi): busy() and
                                                               idle() around each HTTP request
      _SignalDesk.handle: the signals since the last pass,
        in order (SIGHUP reload, SIGTTIN/SIGTTOU spares,
        SIGINT/SIGTERM stop)
      Supervisor.step(1 s), woken at once by a signal

Log records go to ``prefork.serve``: the address it listens on (INFO), a
connection cut off by ``mpm.read_timeout`` (WARNING), an app that raised
(ERROR, with its traceback; for WSGI with the method and path), a signal that
changed nothing (WARNING), children that cannot boot (ERROR); for WSGI also a
refused request or a client gone (INFO).
"""

from __future__ import annotations

import logging
import math
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn, cast

from prefork import _logging, _systemd
from prefork._listen_queue import listen_backlog
from prefork._proctitle import set_title
from prefork._supervisor import Supervisor
from prefork._upgrade import PREDECESSOR, Successor, announce_ready, inherited_listener, ready_fd
from prefork._worker import current_worker
from prefork.config import Config
from prefork.config._imports import import_problems, import_setting
from prefork.errors import ConfigError
from prefork.mpm import MPM
from prefork.strategies.scaling import OnDemandPolicy, SparePolicy

__all__ = ["serve"]

log = logging.getLogger("prefork.serve")


#: connections a child of prefork serve accepts in a row before it looks at its signals
#: pipe and channel again (a sync server's accept loop: no select while connections queue)
_ACCEPT_BURST = 16


def _serve_body(listener: socket.socket, handler: Callable[[socket.socket, Any], Any], read_timeout: float,
                wsgi: bool = False) -> None:
    """A child of ``prefork serve``: accept, handle, repeat; leave on SIGTERM once idle.

    A WSGI handler (``prefork._wsgi``) marks each request busy and idle itself
    and leaves between two requests; it is given the wakeup pipe, so that a
    SIGTERM ends its wait on an idle keep-alive connection.

    Each connection gets ``read_timeout`` (``mpm.read_timeout``, 0: none) as its
    socket timeout: a read or write on it that waits that long raises
    ``TimeoutError`` (``socket.timeout``) in the handler, so a client that sends
    nothing cannot hold this child forever.  The supervisor sends self-feeding
    children no frames: the end of the channel means it gave up on this child (a
    shut-down that began while it was being forked) or is gone, and it leaves."""
    me = current_worker()
    if me is None:
        raise RuntimeError("_serve_body runs in a child of prefork serve")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)

    def on_term(signum: int, frame: FrameType | None) -> None:
        me.leaving = me.leaving or "asked to leave (SIGTERM)"

    signal.signal(signal.SIGTERM, on_term)
    per_request = wsgi
    if wsgi:
        from prefork._wsgi import WSGIHandler  # imported by serve() already

        assert isinstance(handler, WSGIHandler)
        handler.wakeup_fd = wake_r
        handler.listener = listener
    listener.setblocking(False)
    channel = me._channel
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    sel.register(channel.fileno(), selectors.EVENT_READ)
    listen_fd = listener.fileno()
    burst = 0  # connections accepted in a row without waiting in select
    while not me.leaving:
        if 0 < burst < _ACCEPT_BURST:
            fds: Sequence[int] = (listen_fd,)  # busy: the next connection may be queued already, take it without a wait
        else:
            burst = 0
            fds = [key.fd for key, _ in sel.select()]
        for fd in fds:
            if fd == wake_r:
                os.read(wake_r, 512)
                continue
            if fd != listen_fd:  # the channel
                try:
                    channel.recv()
                except OSError:
                    pass
                me.leaving = "the supervisor closed the channel"
                break
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                burst = 0
                continue  # nothing queued, another child took it, or its client reset it in the queue
            burst += 1
            if not per_request:  # the WSGI handler sets its socket's mode itself and times its own waits
                conn.settimeout(read_timeout or None)
                me.busy()
            try:
                handler(conn, addr)
            except TimeoutError as exc:
                log.warning("worker %d: the connection from %s waited longer than mpm.read_timeout = %g s (%s); closed",
                            os.getpid(), addr, read_timeout, exc)
            except Exception:
                log.exception("worker %d: the app failed on the connection from %s; closed", os.getpid(), addr)
            finally:
                conn.close()
            # A child whose next connection (or request) is already there would start it at
            # once: on a busy machine it never sleeps, and the scheduler preempts it in the
            # middle of requests instead.  Yielding here lets the children in the middle of
            # a request finish first (bench_serve.py: p99 in `close` 924 -> 419 µs).
            os.sched_yield()
            if not per_request:
                me.idle()  # leaves here when it must
            elif me.leaving:
                me.exit(0, reason=me.leaving)


def _source(config: Config, key: str) -> str:
    return config.sources.get(key) or config.sources.get(key.rpartition(".")[0]) or "the configuration"


def _refuse(config: Config, key: str, value: Any, reason: str) -> NoReturn:
    raise ConfigError(f"{_source(config, key)}: {key} = {value!r}: {reason}")


def _check_serve_config(config: Config) -> None:
    """Refuse what would leave ``prefork serve`` without a child to accept, or
    silently override a setting: one line naming the source, key, value and reason."""
    if config.app and config.mpm.wsgi:
        raise ConfigError(f"{_source(config, 'app')}: app = {config.app!r} and {_source(config, 'mpm.wsgi')}: "
                          f"mpm.wsgi = {config.mpm.wsgi!r} are both set: prefork serve runs handle(conn, addr) or a "
                          "WSGI app, not both; unset one")
    if not config.app and not config.mpm.wsgi:
        raise ConfigError("app is empty, and so is mpm.wsgi: set app = \"module:handle\", called as handle(conn, addr) "
                          "in a child, or mpm.wsgi = \"module:app\", a WSGI application")
    pol = config.create("scaling")
    always = "a server always keeps a child to accept connections (a reload or SIGTTOU would otherwise leave none)"
    if isinstance(pol, SparePolicy):
        if pol.min_spare < 1:
            _refuse(config, "scaling.min_spare", pol.min_spare, f"prefork serve needs at least 1: {always}")
        if pol.start_servers < 1:
            _refuse(config, "scaling.start_servers", pol.start_servers, "prefork serve needs at least 1: "
                    "the spare policy forks nothing after a start with none")
    elif isinstance(pol, OnDemandPolicy) and pol.pre_fork < 1:
        _refuse(config, "scaling.pre_fork", pol.pre_fork, f"prefork serve needs at least 1: {always}; "
                "its children take no queued tasks, so on-demand never forks more")
    for names, handler in config.mpm.child_sigh.items():
        if any(name.removeprefix("SIG") == "TERM" for name in str(names).split()):
            _refuse(config, f"mpm.child_sigh.{names}", handler, "prefork serve's children handle SIGTERM themselves "
                    "(finish the connection, then leave); set a handler for another signal")


#: what prefork serve does on each signal
_STOP = (signal.SIGINT, signal.SIGTERM)
#: seconds between two logs of the same note ("SIGTTOU changed nothing...")
_NOTE_EVERY = 5.0
_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2, *_STOP)


class _SignalDesk:
    """``prefork serve``'s signals: the handlers only record them (and the loop's wake
    pipe, as ``signal.set_wakeup_fd``, wakes its ``select``); the loop acts on each
    one, in order, between two passes.  A burst of SIGHUPs is one reload under way
    plus at most one more, started once the first one's new children are up."""

    def __init__(self, mpm: MPM) -> None:
        self.mpm = mpm
        self.pending: deque[int] = deque()  # appended by the handlers; popleft() is atomic
        self.stop = False
        self.reload_wanted = False
        self.upgrade_wanted = False
        self.hangups = 0  # SIGHUPs taken so far: each one is a reload systemd may wait for
        self._reload_spawned = -1  # spawned_total when the reload under way began (-1: none)
        self._said: dict[str, float] = {}  # note -> when it was last logged

    def record(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)  # all a handler does: no lock, no I/O

    def ask(self, signum: int, sup: Supervisor) -> str:
        """What the signal would do, asked from another thread (``prefork ctl NAME upgrade``)."""
        self.pending.append(signum)
        sup.wake()
        return "upgrade: a new master is starting on the same socket; this one drains once it is ready"

    def _reloading(self, sup: Supervisor) -> bool:
        """A reload is under way until a new child was forked and none is booting."""
        if self._reload_spawned < 0:
            return False
        stats = sup.stats()
        if stats["spawned_total"] == self._reload_spawned or stats["booting"]:
            return True
        self._reload_spawned = -1
        return False

    def reload_under_way(self, sup: Supervisor) -> bool:
        """A reload is wanted, or under way: its chain is not done, or a replacement is
        still booting.  Only looks: ``_reloading`` forgets a finished reload when the
        next SIGHUP comes, and a storm must find it as it left it."""
        if self.reload_wanted or sup.reloading():
            return True
        if self._reload_spawned < 0:
            return False
        stats = sup.stats()
        return stats["spawned_total"] == self._reload_spawned or stats["booting"] > 0

    def handle(self, sup: Supervisor) -> None:
        notes: set[str] = set()
        while self.pending and not self.stop:
            signum = self.pending.popleft()
            if signum in _STOP:
                self.stop = True
            elif signum == signal.SIGHUP:
                self.reload_wanted = True
                self.hangups += 1
            elif signum == signal.SIGUSR2:
                self.upgrade_wanted = True
            else:
                self._move_spares(1 if signum == signal.SIGTTIN else -1, notes)
        if self.reload_wanted and not self.stop and not self._reloading(sup):
            self.reload_wanted = False
            self._reload_spawned = sup.stats()["spawned_total"]
            self.mpm.reload(chain=True)  # one child at a time: the others keep accepting
        now = time.monotonic()
        for note in sorted(notes):  # once in a while, not once per signal of a storm
            if now - self._said.get(note, -math.inf) >= _NOTE_EVERY:
                self._said[note] = now
                log.warning("%s", note)

    def _move_spares(self, step: int, notes: set[str]) -> None:
        name = "SIGTTIN" if step > 0 else "SIGTTOU"
        bounds = self.mpm.spare_bounds()
        if bounds is None:
            notes.add(f"{name} ignored: scaling is {self.mpm.config.scaling.name!r}; only 'spare' has spare bounds")
            return
        min_spare, max_spare, max_servers = bounds
        low = min(max(1, min_spare + step), max_servers)
        high = min(max(low, max_spare + step), max_servers)
        if (low, high) == (min_spare, max_spare):
            bound = f"the least a server keeps is 1 (min_spare = {low})" if step < 0 else f"max_servers = {max_servers}"
            notes.add(f"{name} changed nothing: {bound}")
            return
        self.mpm.set_spares(low, high)


def _handler(config: Config) -> Callable[[socket.socket, Any], Any]:
    """What each child calls per connection: the app, or a WSGI app served over HTTP/1.1."""
    key, spec = ("mpm.wsgi", config.mpm.wsgi) if config.mpm.wsgi else ("app", config.app)
    calls = "app(environ, start_response)" if config.mpm.wsgi else "handle(conn, addr)"
    target = import_setting(config, key, spec, f"prefork serve calls {calls}")
    problems = import_problems(config, in_worker=False)  # what else this process imports (mpm.child_sigh ...)
    if problems:
        raise problems[0]
    if not config.mpm.wsgi:
        return cast(Callable[[socket.socket, Any], Any], target)
    from prefork._wsgi import make_handler  # without h11: MissingExtra, one line

    return make_handler(target, config.mpm)


def _children_up(sup: Supervisor) -> bool:
    stats = sup.stats()
    return stats["workers"] > 0 and not stats["booting"]


class _Upgrade:
    """SIGUSR2: a new master (this command again) inherits the socket and boots its children;
    only then does this one drain and exit.  If the new one fails, this one keeps serving."""

    def __init__(self, sup: Supervisor, listener: socket.socket, config: Config) -> None:
        self.sup, self.listener, self.config = sup, listener, config
        self.successor: Successor | None = None

    def begin(self) -> None:
        if self.successor is not None:
            log.warning("upgrade: one is under way (new master pid %d); SIGUSR2 ignored", self.successor.pid)
            return
        self.sup.endpoints.close()  # the new master takes the control socket and the endpoints' ports
        try:
            self.successor = Successor.start(self.listener, self.config.pool.boot_timeout)
        except Exception as exc:
            log.error("upgrade: the new master could not be started (%s); this master keeps serving", exc)
            self._take_back()

    def done(self) -> bool:
        """True once the new master is ready (this one must go)."""
        if self.successor is None:
            return False
        state = self.successor.state()
        if state == "booting":
            return False
        if state == "ready":
            log.info("upgrade: the new master (pid %d) is ready; draining and leaving", self.successor.pid)
            return True
        log.error("upgrade failed: the new master (pid %d): %s; this master keeps serving",
                  self.successor.pid, self.successor.why)
        self.successor = None
        self._take_back()
        return False

    def _take_back(self) -> None:
        try:
            self.sup.endpoints.claim()
            self.sup.endpoints.start()
        except Exception:
            log.exception("after a failed upgrade, the control socket and endpoints could not be taken back")


def _open_listener(config: Config, passed: socket.socket | None) -> socket.socket:
    """The socket an old master passed (an upgrade), else the one systemd passed (socket
    activation), else a new one bound to ``mpm.bind``."""
    upgraded = inherited_listener()
    if upgraded is not None:
        return upgraded
    if passed is not None:
        return passed
    host, _, port = config.mpm.bind.rpartition(":")
    try:
        return socket.create_server((host.strip("[]"), int(port)), backlog=config.mpm.backlog)
    except OSError as exc:
        raise ConfigError(f"{_source(config, 'mpm.bind')}: mpm.bind = {config.mpm.bind!r}: cannot listen there: "
                          f"{exc.strerror or exc}") from exc


def serve(config: Config, ready: Callable[[str, int], object] | None = None) -> int:
    """Bind ``mpm.bind``, keep children accepting on it, each calling the config's
    ``app`` as ``handle(conn, addr)``, or serving the WSGI app ``mpm.wsgi`` over
    HTTP/1.1 (``prefork._wsgi``).  SIGHUP: a chain reload, children replaced one
    at a time; SIGUSR2: a zero-downtime upgrade (``prefork._upgrade``: a new master
    inherits the socket; this one drains once it is ready); SIGTTIN/SIGTTOU: one
    more/fewer spare child; SIGINT/SIGTERM: stop.

    ``ready(host, port)`` is called once the socket is bound, before any child is
    forked (``prefork serve`` prints the address there).  Returns 0 once stopped
    by a signal, 1 if children cannot boot; a bad setting raises
    :class:`~prefork.errors.PreforkError` in one line, before anything is bound."""
    _check_serve_config(config)
    # systemd: the socket it passed (LISTEN_*, taken and unset before the app is imported,
    # so neither the app nor the children see them) and the watchdog, which an upgrade's
    # new master takes over from the old one
    passed = _systemd.activated_listener(config)
    predecessor = os.environ.get(PREDECESSOR, "")
    watchdog = _systemd.watchdog_interval(int(predecessor) if predecessor.isdigit() else None)
    handler = _handler(config)
    listener = _open_listener(config, passed)
    tell_old = ready_fd()  # an upgrade: the old master waits for our word
    announcer = _systemd.Announcer(_systemd.describe(listener), watchdog, successor=tell_old >= 0)
    why = "the supervisor failed"  # what STOPPING=1 says, unless a stop signal or a boot failure ends the loop
    mpm = MPM._for_serve(config)  # with the [mpm] settings that only prefork serve honours
    desk = _SignalDesk(mpm)
    _logging.set_role("supervisor")
    set_title(f"{config.name} supervisor")
    # handlers first: a signal during the start is recorded, never the default action
    old = {sig: signal.signal(sig, desk.record) for sig in _SIGNALS}
    wake = -1
    old_wake = -1
    code = 0
    try:
        if listener.family == socket.AF_UNIX:
            bound_host, bound_port = _systemd.describe(listener), 0
        else:
            bound_host, bound_port = listener.getsockname()[:2]
        log.info("listening on %s (%s)", _systemd.describe(listener),
                 f"WSGI app {config.mpm.wsgi}" if config.mpm.wsgi else f"app {config.app}")
        if ready is not None:
            ready(bound_host, bound_port)
        probe = listener
        waiting = (lambda: listen_backlog(probe) or 0) if listen_backlog(listener) is not None else None
        sup = mpm._start(_serve_body, (listener, handler, config.mpm.read_timeout, bool(config.mpm.wsgi)),
                         waiting=waiting, private_fds=(tell_old,) if tell_old >= 0 else ())
        # A signal's C handler writes its number to the loop's wake pipe, so select()
        # returns at once.  Through a copy of the pipe's end that this function owns:
        # it stays valid until the wakeup fd is put back, whatever the supervisor closes.
        wake = os.dup(sup.wakeup_fd)
        sup.ctx.internal_fds.add(wake)
        old_wake = signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
        upgrade = _Upgrade(sup, listener, config)
        sup.upgrader = lambda: desk.ask(signal.SIGUSR2, sup)
        while True:
            desk.handle(sup)
            if desk.stop:
                why = "asked to (SIGTERM or SIGINT); children finish their connections"
                break
            if sup.broken is not None:
                log.error("stopping: %s", sup.broken)
                why = f"children cannot boot: {sup.broken}".splitlines()[0]
                code = 1
                break
            if tell_old >= 0 and _children_up(sup):
                announce_ready(tell_old)
                tell_old = -1
                log.info("upgrade: this master (pid %d) is ready; the old one drains and exits", os.getpid())
            if desk.upgrade_wanted:
                desk.upgrade_wanted = False
                upgrade.begin()
            if upgrade.done():
                assert upgrade.successor is not None
                for message in announcer.hand_over(upgrade.successor.pid):  # systemd's main process now
                    _systemd.notify(message)
                break  # the new master serves: this one drains and exits
            stats = sup.stats()
            seen = _systemd.Seen(stats["idle"], stats["busy"], desk.hangups, desk.reload_under_way(sup))
            for message in announcer.step(time.monotonic_ns(), seen):
                _systemd.notify(message)
            sup.step(announcer.timeout(time.monotonic_ns(), 0.1 if upgrade.successor is not None else 1.0))
    finally:
        for message in announcer.stopping(why):  # nothing after a hand-over
            _systemd.notify(message)
        if wake >= 0:
            signal.set_wakeup_fd(old_wake)
            os.close(wake)
        try:
            mpm.done()  # the handlers still only record: a second SIGTERM cannot cut the shut-down short
        finally:
            listener.close()
            for sig, previous in old.items():
                signal.signal(sig, previous)
    return code
