"""``prefork.Dispatcher``: POE::Component::PreforkDispatch on the prefork core.

A FIFO queue of requests ``{"method_name" | "method", "params", "upon_result"}``
handed to a pool that grows on demand (the core's ``on-demand`` policy);
methods found through the core's resolvers (the request's own callable, the
``methods`` map, each of ``classes``, then the XML-RPC server parent); each
result handed to a callback in the caller (the core's callback sink) as
``(request, response)`` with ``request["elapsed"]`` set.  The seed's special
methods ``_precall``, ``_postcall``, ``_fork_preinit``, ``_fork_postinit`` and
``_fork_init`` run through the core's lifecycle hooks, so a plugin can provide
them too.  With no fork allowed (``max_forks=0``) requests run synchronously.

:class:`XMLRPCFront` serves the dispatcher over HTTP with the standard
library's XML-RPC server (``prefork/_xmlrpc.py``).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError
from typing import Any, Self, TypeAlias, TypeVar, TypeVarTuple, overload

import attrs

from prefork import _progress
from prefork._hooks import hookimpl
from prefork._progress import Progress, ProgressArg
from prefork._supervisor import Supervisor
from prefork._task import Task
from prefork._xmlrpc import XMLRPCFront
from prefork.config import Config, load_facade_config
from prefork.errors import ConfigError, error_text
from prefork.strategies.resolver import MethodResolver, XmlRpcResolver, import_object
from prefork.strategies.sink import CallbackSink

__all__ = ["Dispatcher", "XMLRPCFront"]

log = logging.getLogger("prefork.dispatcher")

_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
_REQUEST_KEYS = frozenset({"method_name", "method", "params", "upon_result", "from"})

#: ``upon_result(request, response)``: a function, or a coroutine function run on the request's event loop
UponResult: TypeAlias = Callable[[dict[str, Any], Any], object]
R = TypeVar("R")
Ts = TypeVarTuple("Ts")


def _print_line(line: str) -> None:
    print(line, flush=True)


class _SpecialMethods:
    """The seed's special methods, found like any other method, run from the core's hooks."""

    def __init__(self, resolver: MethodResolver) -> None:
        self._resolver = resolver
        self._found: dict[str, Callable[..., Any] | None] = {}

    def _method(self, name: str) -> Callable[..., Any] | None:
        if name not in self._found:
            try:
                self._found[name] = _special(self._resolver, name)
            except Exception:
                self._found[name] = None
        return self._found[name]

    def _run(self, name: str, *args: Any) -> None:
        fn = self._method(name)
        if fn is not None:
            fn(*args)

    @hookimpl
    def prefork_before_fork(self) -> None:
        self._run("_fork_preinit")

    @hookimpl
    def prefork_after_fork(self) -> None:
        self._run("_fork_postinit")

    @hookimpl
    def prefork_worker_init(self) -> None:
        self._run("_fork_init")

    @hookimpl
    def prefork_before_call(self, args: tuple[Any, ...]) -> None:
        self._run("_precall", *args)

    @hookimpl
    def prefork_after_call(self, args: tuple[Any, ...]) -> None:
        self._run("_postcall", *args)


def _special(resolver: MethodResolver, name: str) -> Callable[..., Any] | None:
    """Special names start with ``_``, which resolvers hide: look in the map and classes directly."""
    methods = getattr(resolver, "methods", {}) or {}
    target = methods.get(name)
    if isinstance(target, str):
        target = import_object(target)
    if callable(target):
        return target  # type: ignore[no-any-return]
    for holder in getattr(resolver, "classes", ()) or ():
        if isinstance(holder, str):
            holder = import_object(holder) if ":" in holder else importlib.import_module(holder)  # as ClassesResolver
        target = getattr(holder, name, None)
        if callable(target):
            return target  # type: ignore[no-any-return]
    return None


class _Talkback:
    """The dispatcher's log lines, at its ``verbose`` level, to its ``talkback``."""

    def __init__(self, alias: str, verbose: int, talkback: Callable[[str], Any]) -> None:
        self.alias = alias
        self.level = _LEVELS.get(verbose, logging.DEBUG)
        self.talkback = talkback

    def say(self, level: int, message: str) -> None:
        if level >= self.level:
            try:
                self.talkback(f"[{self.alias}] {message}")
            except Exception:
                log.exception("the talkback function failed")

    @hookimpl
    def prefork_log(self, level: int, message: str) -> None:
        self.say(level, message)


class Dispatcher:
    """A preforking request dispatcher (see the module docstring).

    Every argument may also come from a ``prefork.toml`` given as ``config``
    (profile ``dispatcher``); keyword arguments win.

    ``progress``: a bar of the requests answered (with an error too) out of the
    requests made so far, closed by ``shutdown()``: ``True`` (when stderr is a
    terminal), ``"force"``, a bar or a bar factory; see ``docs/progress.md``.
    """

    _bar: Progress | None = None  # the dispatcher's bar (progress=); None: no bar, nothing counted

    def __init__(
        self,
        methods: Mapping[str, Callable[..., Any] | str] | None = None,
        classes: Sequence[Any] | None = None,
        upon_result: UponResult | None = None,
        max_forks: int | None = None,
        pre_fork: int | None = None,
        max_requests: int | None = None,
        verbose: int | None = None,
        talkback: Callable[[str], object] | str | None = None,
        fork_name: str | None = None,
        alias: str | None = None,
        *,
        spawn_delay: float | None = None,
        xmlrpc_server_parent: str | None = None,
        config: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        progress: ProgressArg = False,
        control: bool = False,
    ) -> None:
        settings: dict[str, Any] = {
            "resolver.methods": dict(methods) if methods is not None else None,
            "resolver.classes": list(classes) if classes is not None else None,
            "scaling.max_forks": max_forks,
            "scaling.pre_fork": pre_fork,
            "scaling.spawn_delay": spawn_delay,
            "pool.max_tasks_per_child": max_requests,
            "dispatcher.verbose": verbose,
            "dispatcher.talkback": talkback,
            "dispatcher.alias": alias,
            "dispatcher.xmlrpc_server_parent": xmlrpc_server_parent,
            "name": fork_name,
            "control.enabled": True if control else None,
        }
        if max_forks is not None and pre_fork is None and max_forks < 2:
            settings["scaling.pre_fork"] = max_forks  # the profile's pre_fork = 2 cannot exceed max_forks
        progress_spec = _progress.check(progress, "Dispatcher")
        self._setup(load_facade_config("dispatcher", config, overrides, settings), upon_result, progress_spec)

    @classmethod
    def from_config(
        cls, config: Config, upon_result: UponResult | None = None, *, progress: ProgressArg = False
    ) -> Self:
        """A dispatcher built from an already loaded :class:`Config` (as ``prefork run`` does)."""
        self = cls.__new__(cls)
        self._setup(config, upon_result, _progress.check(progress, "Dispatcher"))
        return self

    def _setup(
        self, config_obj: Config, upon_result: UponResult | None, progress: _progress.Spec | None
    ) -> None:
        opts = config_obj.dispatcher
        config_obj.require("sink", "callback", honoured=("callback",), by="a Dispatcher (results go to upon_result)")
        self.alias = opts.alias
        self._upon_result = upon_result
        if self._upon_result is None and config_obj.sink.name == "callback":
            cb = config_obj.sink.options.get("callback")
            self._upon_result = import_object(cb) if isinstance(cb, str) else cb
        line = opts.talkback or _print_line
        self._talk = _Talkback(opts.alias, opts.verbose, import_object(line) if isinstance(line, str) else line)
        resolver = config_obj.create("resolver")
        if opts.xmlrpc_server_parent:
            if not hasattr(resolver, "extra"):
                raise ConfigError(
                    f"{config_obj.sources.get('dispatcher.xmlrpc_server_parent', 'config')}: dispatcher.xmlrpc_server_parent "
                    f"= {opts.xmlrpc_server_parent!r}: needs the 'chain' resolver, which tries the server parent last; "
                    f"resolver.name = {config_obj.resolver.name!r} has no place for it"
                )
            parent = XmlRpcResolver(opts.xmlrpc_server_parent)
            resolver = attrs.evolve(resolver, extra=(*resolver.extra, parent))
        self._sup = Supervisor(
            config_obj, sink=CallbackSink(self._deliver), resolver=resolver,
            plugins=(_SpecialMethods(resolver), self._talk),
        )
        self._sup.start()
        if progress is not None:
            self._bar = progress.start_for_pool(self, self._sup, "req")
        self._talk.say(logging.INFO, f"dispatcher started ({config_obj.scaling.name} scaling)")

    # -- requests ----------------------------------------------------------------------

    def new_request(self, request: dict[str, Any]) -> int:
        """Queue a request; returns its id.  The request dict is handed back to the
        callback with ``elapsed`` added."""
        method, params, _ = parse_request(request)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._bar is not None:
            self._bar.post()  # before: a request that cannot be serialized is answered in submit()
        task_id: int = self._sup.submit(method, (request.get("from"), *params), context=(request, loop))
        self._talk.say(logging.DEBUG, f"request {task_id} queued: {_describe(method)}")
        return task_id

    @overload
    async def call(self, method: str, *params: Any, from_: Any = None) -> Any: ...
    @overload
    async def call(self, method: Callable[[Any, *Ts], R], *params: *Ts, from_: Any = None) -> R | dict[str, str]: ...
    async def call(self, method: str | Callable[[Any, *Ts], Any], *params: *Ts, from_: Any = None) -> Any:
        """Dispatch one request and await its response (``{"error": ...}`` on failure).

        ``method`` is a name, or a callable given ``(from_, *params)``: type checkers
        check ``params`` against it and type the response as its result or the error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(request: dict[str, Any], response: Any) -> None:
            if not fut.done():
                fut.set_result(response)

        key = "method" if callable(method) else "method_name"
        self.new_request({key: method, "params": list(params), "from": from_, "upon_result": _in_loop(loop, settle)})
        return await fut

    def _deliver(self, task: Task, ok: bool, value: Any) -> None:
        """Runs in the supervisor thread for each finished request."""
        if self._bar is not None and (ok or not isinstance(value, CancelledError)):
            self._bar.done()
        request, loop = task.context
        request["elapsed"] = task.elapsed
        response = value if ok else {"error": _error_text(value)}
        self._talk.say(
            logging.DEBUG if ok else logging.WARNING,
            f"request {task.id} {'done' if ok else 'failed: ' + response['error']} in {task.elapsed:.3f} s",
        )
        cb = request.get("upon_result") or self._upon_result
        if cb is None:
            return
        if inspect.iscoroutinefunction(cb):
            if loop is None or loop.is_closed():
                log.error("request %s: upon_result %r is a coroutine function but no event loop was running "
                          "when the request was made", task.id, cb)
                return
            future = asyncio.run_coroutine_threadsafe(cb(request, response), loop)
            future.add_done_callback(_log_failure)
            return
        cb(request, response)  # an exception here is logged by the callback sink

    # -- life cycle --------------------------------------------------------------------

    def shutdown(self, wait: bool = True) -> None:
        """Answer every queued request, then stop the workers."""
        try:
            self._sup.shutdown(wait=wait)
        finally:
            progress = self._bar
            if progress is not None:
                if wait or self._sup.stopped:
                    progress.close()
                else:
                    sup = self._sup
                    progress.close_when(lambda: bool(sup.stopped))
        self._talk.say(logging.INFO, "dispatcher stopped")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def pids(self) -> list[int]:
        """The pids of the live workers."""
        return self._sup.pids()

    def status(self) -> dict[str, Any]:
        """The pool's status as JSON data: every worker (state, task, method, run time, memory)
        and the totals (docs/operations.md); from any thread."""
        return self._sup.status()

    def stats(self) -> dict[str, int]:
        return self._sup.stats()


def _in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., None]) -> Callable[..., None]:
    def call(*args: Any) -> None:
        loop.call_soon_threadsafe(fn, *args)

    return call


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("an upon_result coroutine failed", exc_info=exc)


def _describe(method: Any) -> str:
    return method if isinstance(method, str) else getattr(method, "__qualname__", repr(method))


def parse_request(request: Any) -> tuple[Any, Sequence[Any], Callable[..., Any] | None]:
    """``(method, params, upon_result)`` of a request, checked as ``new_request``
    checks it (and as every other front of the dispatcher profile must), with
    errors that say what is wrong; the method is the callable or the name."""
    if not isinstance(request, dict):
        raise TypeError(f"new_request: a request is a dict, not {type(request).__name__}")
    unknown = set(request) - _REQUEST_KEYS - {"elapsed"}
    if unknown:
        raise ValueError(f"new_request: unknown key(s) {sorted(unknown)}; a request has {sorted(_REQUEST_KEYS)}")
    method = request.get("method")
    if method is None:
        method = request.get("method_name")
        if not isinstance(method, str) or not method:
            raise ValueError("new_request: the request needs a 'method' (callable) or a 'method_name' (string)")
    elif not callable(method):
        raise TypeError(f"new_request: 'method' must be callable, not {type(method).__name__}")
    params = request.get("params", [])
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise TypeError(f"new_request: 'params' must be a list, not {type(params).__name__}")
    callback = request.get("upon_result")
    if callback is not None and not callable(callback):
        raise TypeError(f"new_request: 'upon_result' must be callable, not {type(callback).__name__}")
    return method, params, callback


def _error_text(exc: BaseException) -> str:
    text = error_text(exc)
    name = getattr(exc, "type_name", type(exc).__name__)
    return text if name in ("WorkerLost", "TaskTimeout", "MethodNotFound") else f"{name}: {text}"
