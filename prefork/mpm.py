"""``prefork.MPM``: Parallel::MPM::Prefork on the prefork core.

Children feed themselves (typically ``accept()`` on a listening socket the
parent bound) and report ``busy()``/``idle()`` through the core's scoreboard;
the core's ``spare`` policy keeps idle children between ``min_spare`` and
``max_spare``, never more than ``max_servers``, forking 1, 2, 4 ... 32 per tick
while short and retiring one surplus idle child per tick with SIGTERM.  There
is no second supervisor: the caller drives the core's loop (``whip_kids`` or
``kid_new`` in a loop, as with the seed), or ``prefork serve`` (:mod:`prefork.serve`) does.

Children send data at any time with ``yell(data)`` or ``exit(code, data)``;
each message crosses the child's own channel in length-prefixed frames, so
messages of any size arrive whole and never interleave.  ``child_data_hook``
runs in the main process or in a dedicated data-hook process (``prefork/_datahook.py``).

Module functions with the seed's names (``pf_init``, ``pf_whip_kids``,
``pf_kid_new``, ``pf_kid_busy``, ``pf_kid_idle``, ``pf_kid_yell``,
``pf_kid_exit``, ``pf_done``) wrap one module-level :class:`MPM`.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, NoReturn, Self, TypeVarTuple, overload

import attrs

from prefork._datahook import _DataForwarder, _DataHookProcess
from prefork._supervisor import Supervisor
from prefork._worker import STACK_SIGNAL, ForkedChild, WorkerHandle, current_worker
from prefork.config import Config, load_facade_config
from prefork.config._imports import import_problems, import_setting
from prefork.config.model import MPMConfig
from prefork.errors import ConfigError, PreforkError
from prefork.strategies.resolver import import_object
from prefork.strategies.scaling import SparePolicy

__all__ = ["MPM", "busy", "exit", "idle", "pf_done", "pf_init", "pf_kid_busy", "pf_kid_exit", "pf_kid_idle",
           "pf_kid_new", "pf_kid_yell", "pf_whip_kids", "yell"]  # fmt: skip

Ts = TypeVarTuple("Ts")  # the arguments whip_kids' code is given


# -- in the child -----------------------------------------------------------------------


def _me() -> WorkerHandle:
    handle = current_worker()
    if handle is None:
        raise RuntimeError("this is not a prefork child: busy(), idle(), yell() and exit() run in children")
    return handle


def busy() -> None:
    """Tell the parent this child is busy (``pf_kid_busy``)."""
    _me().busy()


def idle(keepalive: bool = False) -> None:
    """Tell the parent this child is idle again (``pf_kid_idle``); a child past its
    request budget or memory limit, or asked to leave while busy, exits here.
    ``keepalive=True``: the request is done but the child waits on its client's
    connection for the next one (see ``WorkerHandle.idle``)."""
    _me().idle(keepalive=keepalive)


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


# -- the parent ---------------------------------------------------------------------------------


def _user_set(source: str) -> bool:
    return source not in ("", "defaults") and not source.startswith("profile ")


def _refuse_serve_only(config: Config) -> None:
    """An ``[mpm]`` setting only ``prefork serve`` honours (``bind``, ``wsgi``, the WSGI
    limits ...) is refused, never ignored: set by the user's file or keyword arguments, or
    different from its default."""
    defaults = MPMConfig()
    for field in attrs.fields(MPMConfig):
        if not field.metadata.get("serve_only"):
            continue
        key = f"mpm.{field.name}"
        value = getattr(config.mpm, field.name)
        source = config.sources.get(key, "")
        if value != getattr(defaults, field.name) or _user_set(source):
            raise ConfigError(f"{source or 'the configuration'}: {key} = {value!r}: honoured by `prefork serve` only; "
                              "prefork.MPM (and `prefork run`) binds nothing: its children find their own work. "
                              "Remove it, or start this config with `prefork serve`")


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
        child_sigh: Mapping[str, Callable[[int, FrameType | None], object] | str] | None = None,
        child_data_hook: Callable[[int, Any, int | None], object] | str | None = None,
        data_hook_in_main: bool | None = None,
        *,
        config: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        control: bool = False,
    ) -> None:
        settings = {
            "scaling.start_servers": start_servers,
            "scaling.min_spare": min_spare_servers,
            "scaling.max_spare": max_spare_servers,
            "scaling.max_servers": max_servers,
            "mpm.child_sigh": dict(child_sigh) if child_sigh is not None else None,
            "mpm.child_data_hook": child_data_hook,
            "mpm.data_hook_in_main": data_hook_in_main,
            "control.enabled": True if control else None,
        }
        self._setup(load_facade_config("mpm", config, overrides, settings))

    @classmethod
    def from_config(cls, config: Config) -> Self:
        """An MPM built from an already loaded :class:`Config`."""
        self = cls.__new__(cls)
        self._setup(config)
        return self

    @classmethod
    def _for_serve(cls, config: Config) -> MPM:
        """``prefork serve``'s MPM: the one that honours the ``[mpm]`` settings of a server."""
        self = cls.__new__(cls)
        self._setup(config, serving=True)
        return self

    def _setup(self, config: Config, serving: bool = False) -> None:
        if not serving:
            _refuse_serve_only(config)
        problems = import_problems(config, "mpm.", in_worker=False)  # child_data_hook, child_sigh: one line each
        if problems:
            raise problems[0]
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
        self._hook = import_setting(config, "mpm.child_data_hook", hook) if isinstance(hook, str) else hook

    def _start(
        self, body: Callable[..., Any] | None, args: tuple[Any, ...], return_in_child: bool = False,
        waiting: Callable[[], int] | None = None, private_fds: tuple[int, ...] = (),
    ) -> Supervisor:
        if self._hook is not None and self._hook_process is None and not self.config.mpm.data_hook_in_main:
            self._hook_process = _DataHookProcess(self._hook, self.config.name)
        # this pool's own hook: on a plugin manager of its own, gone with the pool, so
        # MPMs made from one Config never get each other's children's data
        plugins = (_DataForwarder(self._hook, self._hook_process),) if self._hook is not None else ()
        self._code = body
        sup = Supervisor(
            self.config, threaded=False, body=_child_main if body is not None else None,
            body_args=(body, args, self._child_signals), child_signals=self._child_signals,
            return_in_child=return_in_child, plugins=plugins, waiting=waiting, private_fds=private_fds,
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

    @overload
    def whip_kids(self, code: Callable[[], object], args: tuple[()] = (), timeout: float | None = None) -> int | None: ...
    @overload
    def whip_kids(self, code: Callable[[*Ts], object], args: tuple[*Ts], timeout: float | None = None) -> int | None: ...
    @overload
    def whip_kids(self, code: Callable[..., object], args: list[Any], timeout: float | None = None) -> int | None: ...
    def whip_kids(
        self, code: Callable[..., object], args: tuple[Any, ...] | list[Any] = (), timeout: float | None = None
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
                    pool = self.config.pool
                    self._hook_process.close(pool.graceful_timeout, pool.kill_grace)
                    self._hook_process = None
        finally:
            code = self._in_done.pop(me, None)
        if code is not None:
            sys.exit(code)

    def pids(self) -> list[int]:
        return self._sup.pids() if self._sup is not None else []

    def status(self) -> dict[str, Any]:
        """The pool's status as JSON data: every child (state, run time, memory) and the
        totals (docs/operations.md); from any thread, once ``whip_kids``/``kid_new`` started it."""
        if self._sup is None:
            raise RuntimeError("this MPM has no children yet: whip_kids() or kid_new() starts it")
        return self._sup.status()

    def stats(self) -> dict[str, int]:
        """Children booting/idle/busy, as the spare policy sees them."""
        if self._sup is None:
            return {"workers": 0, "idle": 0, "busy": 0, "booting": 0}
        return self._sup.stats()

    def spare_bounds(self) -> tuple[int, int, int] | None:
        """``(min_spare, max_spare, max_servers)`` as the running pool keeps them; ``None``
        before the first ``whip_kids``/``kid_new`` or with a policy other than ``spare``."""
        if self._sup is None:
            return None
        pol = self._after_start or self._sup.policy
        return (pol.min_spare, pol.max_spare, pol.max_servers) if isinstance(pol, SparePolicy) else None

    def set_spares(self, min_spare: int, max_spare: int) -> None:
        """Move the spare bounds while running (SIGTTIN/SIGTTOU in ``prefork serve``);
        for the ``spare`` scaling policy only."""
        if self._sup is None:
            raise RuntimeError("not started")
        if self.spare_bounds() is None:
            raise RuntimeError(f"set_spares() needs the 'spare' scaling policy; this pool's is {self.config.scaling.name!r}")
        # while kid_new's start is on, the running policy differs from spare_bounds() only in these two
        self._sup.update_policy(min_spare=min_spare, max_spare=max_spare)
        self._after_start = None

    def reload(self, chain: bool = False) -> None:
        """Replace every child: new ones are forked while the old ones finish their
        current work and leave (SIGHUP in ``prefork serve``).  The new ones are
        those the scaling policy wants once the old ones stopped counting: with
        ``min_spare = 0``, none until a child is wanted.  ``chain``: one child at a
        time, the next once the last one left and its replacement is up."""
        if self._sup is not None:
            self._sup.retire_all("reload", chain=chain)


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
