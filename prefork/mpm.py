"""``prefork.MPM``: Parallel::MPM::Prefork on the prefork core.

Children feed themselves (typically ``accept()`` on a listening socket the
parent bound) and report ``busy()``/``idle()`` through the core's scoreboard;
the core's ``spare`` policy keeps idle children between ``min_spare`` and
``max_spare``, never more than ``max_servers``, forking 1, 2, 4 ... 32 per tick
while short and retiring one surplus idle child per tick with SIGTERM.  There
is no second supervisor: the caller drives the core's loop (``whip_kids`` or
``kid_new`` in a loop, as with the seed), or ``prefork serve`` does.

Children send data at any time with ``yell(data)`` or ``exit(code, data)``;
each message crosses the child's own channel in length-prefixed frames, so
messages of any size arrive whole and never interleave.  ``child_data_hook``
runs in the main process or in a dedicated data-hook process.

Module functions with the seed's names (``pf_init``, ``pf_whip_kids``,
``pf_kid_new``, ``pf_kid_busy``, ``pf_kid_idle``, ``pf_kid_yell``,
``pf_kid_exit``, ``pf_done``) wrap one module-level :class:`MPM`.
"""

from __future__ import annotations

import faulthandler
import math
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, NoReturn

import cloudpickle  # type: ignore[import-untyped]

from prefork._hooks import hookimpl
from prefork._proctitle import set_title
from prefork._supervisor import Supervisor
from prefork._task import WorkerInfo
from prefork._worker import STACK_SIGNAL, ForkedChild, WorkerHandle, current_worker, reset_signals
from prefork.config import Config, load_facade_config
from prefork.errors import PreforkError
from prefork.strategies.resolver import import_object
from prefork.strategies.scaling import OnDemandPolicy, SparePolicy

__all__ = [
    "MPM",
    "busy",
    "exit",
    "idle",
    "pf_done",
    "pf_init",
    "pf_kid_busy",
    "pf_kid_exit",
    "pf_kid_idle",
    "pf_kid_new",
    "pf_kid_yell",
    "pf_whip_kids",
    "serve",
    "yell",
]

_LEN = struct.Struct("<Q")


# -- in the child -----------------------------------------------------------------------


def _me() -> WorkerHandle:
    handle = current_worker()
    if handle is None:
        raise RuntimeError("this is not a prefork child: busy(), idle(), yell() and exit() run in children")
    return handle


def busy() -> None:
    """Tell the parent this child is busy (``pf_kid_busy``)."""
    _me().busy()


def idle() -> None:
    """Tell the parent this child is idle again (``pf_kid_idle``); a child past its
    request budget or memory limit, or asked to leave while busy, exits here."""
    _me().idle()


def yell(data: Any) -> None:
    """Send ``data`` to the parent's ``child_data_hook`` (``pf_kid_yell``); any size."""
    _me().yell(data)


def exit(code: int = 0, data: Any = None) -> NoReturn:
    """Send ``data`` (if given) with ``code`` to the parent, then leave (``pf_kid_exit``)."""
    _me().exit(code, data)


# -- signal specifications -------------------------------------------------------------------


def parse_child_sigh(spec: Mapping[str, Any]) -> dict[int, Any]:
    """``{"TERM INT": fn, "HUP": "IGNORE"}`` to ``{signal number: handler}``."""
    out: dict[int, Any] = {}
    for names, handler in spec.items():
        if handler == "DEFAULT":
            action: Any = signal.SIG_DFL
        elif handler == "IGNORE":
            action = signal.SIG_IGN
        elif isinstance(handler, str):
            action = import_object(handler)
        else:
            action = handler
        for name in str(names).split():
            out[int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))] = action
    return out


def _claim_child_signals(handlers: Mapping[int, Any]) -> None:
    """In a new child: ``child_sigh``'s handler for the signal prefork's workers dump
    their stack on (SIGUSR2) wins.  The core arms that dump in every worker after
    installing ``child_sigh``; MPM children run no tasks, so no timeout ever asks
    them for a stack, and the user's handler is put back."""
    if STACK_SIGNAL in handlers:
        faulthandler.unregister(STACK_SIGNAL)
        signal.signal(STACK_SIGNAL, handlers[STACK_SIGNAL])


def _child_main(code: Callable[..., Any], args: tuple[Any, ...], handlers: Mapping[int, Any]) -> Any:
    """The body every ``whip_kids`` child runs: claim its signals, then ``code(*args)``."""
    _claim_child_signals(handlers)
    return code(*args)


# -- the data hook ----------------------------------------------------------------------------


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
                set_title(f"{name} datahook")
                _serve_data_hook(child, hook)
            except BaseException:
                traceback.print_exc()
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

    def close(self) -> None:
        """No more data: the process runs the hook on what is left, then exits."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
        os.waitpid(self.pid, 0)


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
            traceback.print_exc()


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


# -- the parent ---------------------------------------------------------------------------------


class MPM:
    """A self-regulating pool of children that find their own work.

    Arguments may also come from a ``prefork.toml`` (profile ``mpm``) given as
    ``config``; keyword arguments win.  Nothing is forked before the first
    ``whip_kids`` or ``kid_new``.
    """

    def __init__(
        self,
        start_servers: int | None = None,
        min_spare_servers: int | None = None,
        max_spare_servers: int | None = None,
        max_servers: int | None = None,
        child_sigh: Mapping[str, Any] | None = None,
        child_data_hook: Callable[..., Any] | str | None = None,
        data_hook_in_main: bool | None = None,
        *,
        config: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        settings = {
            "scaling.start_servers": start_servers,
            "scaling.min_spare": min_spare_servers,
            "scaling.max_spare": max_spare_servers,
            "scaling.max_servers": max_servers,
            "mpm.child_sigh": dict(child_sigh) if child_sigh is not None else None,
            "mpm.child_data_hook": child_data_hook,
            "mpm.data_hook_in_main": data_hook_in_main,
        }
        self._setup(load_facade_config("mpm", config, overrides, settings))

    @classmethod
    def from_config(cls, config: Config) -> MPM:
        """An MPM built from an already loaded :class:`Config`."""
        self = cls.__new__(cls)
        self._setup(config)
        return self

    def _setup(self, config: Config) -> None:
        self.config = config
        self._owner = os.getpid()
        self._sup: Supervisor | None = None
        self._code: Callable[..., Any] | None = None  # what whip_kids' children run
        self._done = False
        # one thread steps the core's loop at a time; a done() from a signal handler
        # (or a hook) that interrupts a step on the same thread is deferred to the end of that step
        self._lock = threading.RLock()
        self._stepping = 0  # ident of the thread inside a step, 0: none
        self._deferred: tuple[int | None] | None = None
        self._in_done: dict[int, int | None] = {}  # thread ident -> exit code, while done() shuts down there
        self._after_start: SparePolicy | None = None  # kid_new's policy once start_servers were forked
        self._hook_process: _DataHookProcess | None = None
        opts = config.mpm
        self._child_signals = parse_child_sigh(opts.child_sigh)
        hook = opts.child_data_hook or None
        self._hook = import_object(hook) if isinstance(hook, str) else hook

    def _start(self, body: Callable[..., Any] | None, args: tuple[Any, ...], return_in_child: bool = False) -> Supervisor:
        if self._hook is not None and self._hook_process is None and not self.config.mpm.data_hook_in_main:
            self._hook_process = _DataHookProcess(self._hook, self.config.name)
        # this pool's own hook: on a plugin manager of its own, gone with the pool, so
        # MPMs made from one Config never get each other's children's data
        plugins = (_DataForwarder(self._hook, self._hook_process),) if self._hook is not None else ()
        self._code = body
        sup = Supervisor(
            self.config, threaded=False, body=_child_main if body is not None else None,
            body_args=(body, args, self._child_signals), child_signals=self._child_signals,
            return_in_child=return_in_child, plugins=plugins,
        )
        if self._hook_process is not None:
            sup.ctx.internal_fds.add(self._hook_process.sock.fileno())
        pol = sup.policy
        if return_in_child and isinstance(pol, SparePolicy) and pol.start_servers > pol.min_spare:
            # kid_new forks one child per call, so the policy's first look (start_servers at
            # once) forks only one: until start_servers children were forked, want that many
            self._after_start = pol
            sup.update_policy(min_spare=pol.start_servers, max_spare=max(pol.max_spare, pol.start_servers))
        sup.start()
        self._sup = sup
        return sup

    def _check_parent(self, what: str) -> None:
        if os.getpid() != self._owner:
            raise RuntimeError(f"{what} is for the parent; this is a child (pid {os.getpid()})")

    def whip_kids(
        self, code: Callable[..., Any], args: tuple[Any, ...] | list[Any] = (), timeout: float | None = None
    ) -> int | None:
        """Keep the children going, each running ``code(*args)``; return 1 as soon
        as a child changed status, sent data or exited (or ``timeout`` seconds
        passed without that), 0 once ``done`` was called, ``None`` when the pool
        cannot fork (children fail to boot)."""
        self._check_parent("whip_kids()")
        if self._done:
            return 0
        sup = self._sup
        if sup is None:
            sup = self._start(code, tuple(args))
        elif sup.self_feeding and self._code is not code:
            raise RuntimeError("whip_kids() was started with another code; use one MPM per kind of child")
        seen = sup.events
        end = None if timeout is None else time.monotonic() + timeout
        while sup.events == seen:
            if sup.broken is not None:
                return None
            if self._done or sup.stopped:
                self._finish_deferred()
                return 0
            left = 1.0 if end is None else end - time.monotonic()
            if left <= 0:
                break
            self._step(sup, min(left, 1.0))
        return 1

    def _step(self, sup: Supervisor, timeout: float = 1.0) -> None:
        with self._lock:
            if self._done:
                return
            self._stepping = threading.get_ident()
            try:
                sup.step(timeout)
            finally:
                self._stepping = 0
        self._finish_deferred()

    def _finish_deferred(self) -> None:
        if self._deferred is not None:
            (code,) = self._deferred
            self._deferred = None
            self.done(code)

    def kid_new(self) -> int | None:
        """Block until a new child is wanted, then fork it: the child's pid in the
        parent, 0 in the child (which goes on with the caller's code), -1 once
        ``done`` was called, ``None`` when the pool cannot fork.  The first
        ``start_servers`` calls fork at once."""
        self._check_parent("kid_new()")
        if self._done:
            return -1
        sup = self._sup
        if sup is None:
            sup = self._start(None, (), return_in_child=True)
        spawned = sup.spawned_total
        try:
            while sup.spawned_total == spawned:
                if sup.broken is not None:
                    return None
                if self._done or sup.stopped:
                    self._finish_deferred()
                    return -1
                self._step(sup)
        except ForkedChild:
            self._owner = -1  # this copy is a child now
            _claim_child_signals(self._child_signals)
            return 0
        after = self._after_start
        if after is not None and sup.spawned_total >= after.start_servers:
            self._after_start = None
            sup.update_policy(min_spare=after.min_spare, max_spare=after.max_spare)  # the seed's bounds again
        return sup.last_spawned  # a direct fork's pid is known within the pass that forked it

    def done(self, exitcode: int | None = None) -> None:
        """SIGTERM every child, wait for them, deliver the data they still send,
        stop the data-hook process; then exit with ``exitcode`` if given.

        Safe in a signal handler: called while ``whip_kids``/``kid_new`` runs, it
        takes effect as soon as that call's current pass ends.  Re-entrant: a
        ``done()`` called while one runs on the same thread (a second SIGTERM,
        ``child_data_hook`` calling it during the final delivery) returns at once;
        an ``exitcode`` it gives is the one the running ``done()`` exits with if
        that one has none.  From another thread it returns once the pool stopped."""
        self._check_parent("done()")
        me = threading.get_ident()
        if me in self._in_done:  # re-entered: the running done() goes on when this returns
            if self._in_done[me] is None:
                self._in_done[me] = exitcode
            return
        self._done = True
        if self._stepping == me:
            if self._deferred is None or self._deferred[0] is None:
                self._deferred = (exitcode,)
            if self._sup is not None:
                self._sup.wake()  # never waits for a lock this thread holds
            return
        self._in_done[me] = exitcode
        try:
            with self._lock:
                if self._sup is not None:
                    self._sup.shutdown(wait=True)
                if self._hook_process is not None:
                    self._hook_process.close()
                    self._hook_process = None
        finally:
            code = self._in_done.pop(me, None)
        if code is not None:
            sys.exit(code)

    def pids(self) -> list[int]:
        return self._sup.pids() if self._sup is not None else []

    def stats(self) -> dict[str, int]:
        """Children booting/idle/busy, as the spare policy sees them."""
        if self._sup is None:
            return {"workers": 0, "idle": 0, "busy": 0, "booting": 0}
        return self._sup.stats()

    def set_spares(self, min_spare: int, max_spare: int) -> None:
        """Move the spare bounds while running (SIGTTIN/SIGTTOU in ``prefork serve``);
        for the ``spare`` scaling policy only."""
        if self._sup is None:
            raise RuntimeError("not started")
        pol = self._after_start or self._sup.policy
        if not isinstance(pol, SparePolicy):
            raise RuntimeError(f"set_spares() needs the 'spare' scaling policy; this pool's is {self.config.scaling.name!r}")
        # while kid_new's start is on, the running policy differs from ``pol`` only in these two
        self._sup.update_policy(min_spare=min_spare, max_spare=max_spare)
        self._after_start = None

    def reload(self) -> None:
        """Replace every child: new ones are forked while the old ones finish their
        current work and leave (SIGHUP in ``prefork serve``).  The new ones are
        those the scaling policy wants once the old ones stopped counting: with
        ``min_spare = 0``, none until a child is wanted."""
        if self._sup is not None:
            self._sup.retire_all("reload")


# -- the seed's functions -------------------------------------------------------------------------

_global: MPM | None = None
#: the seed's $Parallel::MPM::Prefork::error
error = ""


def pf_init(**options: Any) -> bool:
    """Set up the module-level MPM; false (with ``error`` set) on a bad option."""
    global _global, error
    try:
        _global = MPM(**options)
    except (PreforkError, TypeError, ValueError) as exc:
        error = str(exc)
        return False
    return True


def _global_mpm() -> MPM:
    if _global is None:
        raise RuntimeError("call pf_init() first")
    return _global


def pf_whip_kids(code: Callable[..., Any], args: tuple[Any, ...] | list[Any] = ()) -> int | None:
    return _global_mpm().whip_kids(code, args)


def pf_kid_new() -> int | None:
    return _global_mpm().kid_new()


def pf_done(exitcode: int | None = None) -> None:
    _global_mpm().done(exitcode)


def pf_kid_yell(data: Any) -> bool | None:
    """The seed's ``pf_kid_yell``: send ``data`` to ``child_data_hook``; ``True`` on
    success, ``None`` (with ``error`` set) when ``data`` cannot be serialized, and a
    no-op returning ``None`` in the main process (``yell`` raises there)."""
    global error
    handle = current_worker()
    if handle is None:
        return None
    try:
        handle.yell(data)
    except TypeError as exc:
        error = str(exc)
        return None
    return True


pf_kid_busy = busy
pf_kid_idle = idle
pf_kid_exit = exit


# -- prefork serve ------------------------------------------------------------------------------------


def _serve_body(listener: socket.socket, handler: Callable[[socket.socket, Any], Any], read_timeout: float) -> None:
    """A child of ``prefork serve``: accept, handle, repeat; leave on SIGTERM once idle.

    Each connection gets ``read_timeout`` (``mpm.read_timeout``, 0: none) as its
    socket timeout: a read or write on it that waits that long raises
    ``TimeoutError`` (``socket.timeout``) in the handler, so a client that sends
    nothing cannot hold this child forever.  The supervisor sends self-feeding
    children no frames: the end of the channel means it gave up on this child (a
    shut-down that began while it was being forked) or is gone, and it leaves."""
    me = _me()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)

    def on_term(signum: int, frame: FrameType | None) -> None:
        me.leaving = me.leaving or "asked to leave (SIGTERM)"

    signal.signal(signal.SIGTERM, on_term)
    listener.setblocking(False)
    channel = me._channel
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    sel.register(channel.fileno(), selectors.EVENT_READ)
    while not me.leaving:
        for key, _ in sel.select():
            if key.fd == wake_r:
                os.read(wake_r, 512)
                continue
            if key.fd == channel.fileno():
                try:
                    channel.recv()
                except OSError:
                    pass
                me.leaving = "the supervisor closed the channel"
                break
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another child took it
            conn.settimeout(read_timeout or None)
            me.busy()
            try:
                handler(conn, addr)
            except TimeoutError as exc:
                print(f"prefork serve: worker {os.getpid()}: the connection from {addr} waited longer than "
                      f"mpm.read_timeout = {read_timeout:g} s ({exc}); closed", file=sys.stderr, flush=True)
            except Exception:
                print(f"prefork serve: worker {os.getpid()}: handle(conn, addr) failed for {addr}:", file=sys.stderr)
                traceback.print_exc()
            finally:
                conn.close()
            me.idle()  # leaves here when it must


def _refuse(config: Config, key: str, value: Any, reason: str) -> NoReturn:
    source = config.sources.get(key) or config.sources.get(key.rpartition(".")[0]) or "the configuration"
    raise PreforkError(f"{source}: {key} = {value!r}: {reason}")


def _check_serve_config(config: Config) -> None:
    """Refuse what would leave ``prefork serve`` without a child to accept, or
    silently override a setting: one line naming the source, key, value and reason."""
    if not config.app:
        raise PreforkError("app is empty: set app = \"module:handle\", called as handle(conn, addr) in a child")
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
#: seconds between two prints of the same note ("SIGTTOU changed nothing...")
_NOTE_EVERY = 5.0
_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, *_STOP)


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
        self._reload_spawned = -1  # spawned_total when the reload under way began (-1: none)
        self._said: dict[str, float] = {}  # note -> when it was last printed

    def record(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)  # all a handler does: no lock, no I/O

    def _reloading(self, sup: Supervisor) -> bool:
        """A reload is under way until a new child was forked and none is booting."""
        if self._reload_spawned < 0:
            return False
        stats = sup.stats()
        if stats["spawned_total"] == self._reload_spawned or stats["booting"]:
            return True
        self._reload_spawned = -1
        return False

    def handle(self, sup: Supervisor) -> None:
        notes: set[str] = set()
        while self.pending and not self.stop:
            signum = self.pending.popleft()
            if signum in _STOP:
                self.stop = True
            elif signum == signal.SIGHUP:
                self.reload_wanted = True
            else:
                self._move_spares(sup, 1 if signum == signal.SIGTTIN else -1, notes)
        if self.reload_wanted and not self.stop and not self._reloading(sup):
            self.reload_wanted = False
            self._reload_spawned = sup.stats()["spawned_total"]
            self.mpm.reload()
        now = time.monotonic()
        for note in sorted(notes):  # once in a while, not once per signal of a storm
            if now - self._said.get(note, -math.inf) >= _NOTE_EVERY:
                self._said[note] = now
                print(f"prefork serve: {note}", file=sys.stderr, flush=True)

    def _move_spares(self, sup: Supervisor, step: int, notes: set[str]) -> None:
        name = "SIGTTIN" if step > 0 else "SIGTTOU"
        pol = self.mpm._after_start or sup.policy
        if not isinstance(pol, SparePolicy):
            notes.add(f"{name} ignored: scaling is {self.mpm.config.scaling.name!r}; only 'spare' has spare bounds")
            return
        low = min(max(1, pol.min_spare + step), pol.max_servers)
        high = min(max(low, pol.max_spare + step), pol.max_servers)
        if (low, high) == (pol.min_spare, pol.max_spare):
            bound = f"the least a server keeps is 1 (min_spare = {low})" if step < 0 else f"max_servers = {pol.max_servers}"
            notes.add(f"{name} changed nothing: {bound}")
            return
        self.mpm.set_spares(low, high)


def serve(config: Config) -> int:
    """Bind ``mpm.bind``, keep children accepting on it, each calling the config's
    ``app`` as ``handle(conn, addr)``.  SIGHUP: new children, old ones finish and
    leave; SIGTTIN/SIGTTOU: one more/fewer spare child; SIGINT/SIGTERM: stop.
    Returns 0 once stopped by a signal, 1 if children cannot boot."""
    _check_serve_config(config)
    try:
        handler = import_object(config.app)
    except (ImportError, AttributeError, ValueError) as exc:
        _refuse(config, "app", config.app, f"cannot import it: {exc}")
    if not callable(handler):
        _refuse(config, "app", config.app, f"{type(handler).__name__} is not callable; prefork serve calls handle(conn, addr)")
    host, _, port = config.mpm.bind.rpartition(":")
    listener = socket.create_server((host.strip("[]"), int(port)), backlog=config.mpm.backlog)
    mpm = MPM.from_config(config)
    desk = _SignalDesk(mpm)
    set_title(f"{config.name} supervisor")
    # handlers first: a signal during the start is recorded, never the default action
    old = {sig: signal.signal(sig, desk.record) for sig in _SIGNALS}
    wake = -1
    old_wake = -1
    code = 0
    try:
        print(f"prefork serve: listening on {listener.getsockname()[0]}:{listener.getsockname()[1]}", flush=True)
        sup = mpm._start(_serve_body, (listener, handler, config.mpm.read_timeout))
        # A signal's C handler writes its number to the loop's wake pipe, so select()
        # returns at once.  Through a copy of the pipe's end that this function owns:
        # it stays valid until the wakeup fd is put back, whatever the supervisor closes.
        wake = os.dup(sup.wakeup_fd)
        sup.ctx.internal_fds.add(wake)
        old_wake = signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
        while True:
            desk.handle(sup)
            if desk.stop:
                break
            if sup.broken is not None:
                print(f"prefork serve: {sup.broken}", file=sys.stderr, flush=True)
                code = 1
                break
            sup.step(1.0)
    finally:
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
