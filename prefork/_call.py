"""Running one task: decode, resolve, hooks, call, encode.  Used by every worker
and by the synchronous fallback (a pool with no workers runs tasks in place)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from prefork import _frames
from prefork._task import WorkerInfo
from prefork.errors import MethodNotFound, RemoteTaskError, error_text
from prefork.strategies import optional
from prefork.strategies.resolver import MethodResolver, is_private
from prefork.strategies.serializer import Serializer


class _RemoteTraceback(Exception):
    """Chained as ``__cause__`` of a task's exception: the worker's traceback text."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def encode_error(serializer: Serializer, exc: BaseException, tb_text: str) -> bytes:
    """The bytes of an error outcome; always decodable by :func:`decode_error`."""
    if serializer.objects:
        try:
            data = serializer.dumps((exc, tb_text))
            serializer.loads(data)  # an exception that cannot be rebuilt must not reach the caller
            return data
        except BaseException:  # whatever its __reduce__ raises, even SystemExit
            remote = RemoteTaskError(_qualname(type(exc)), _safe_str(exc), tb_text)
            return serializer.dumps((remote, tb_text))
    return serializer.dumps([_qualname(type(exc)), _safe_str(exc), tb_text])


def buffer_loads(serializer: Serializer) -> Callable[[Any], Any]:
    """``serializer.loads`` for payloads that may be views (memoryview, bytearray):
    passed as they are when the serializer says it ``takes_buffers``, else as bytes."""
    if optional.takes_buffers(serializer):
        return serializer.loads
    loads = serializer.loads
    return lambda data: loads(data if type(data) is bytes else bytes(data))


def decode_error(serializer: Serializer, data: Any) -> BaseException:
    try:
        obj = buffer_loads(serializer)(data)
    except BaseException as exc:
        return RemoteTaskError(type(exc).__name__, f"the task's error could not be decoded: {exc}", "")
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], BaseException):
        error: BaseException = obj[0]
        if obj[1]:
            error.__cause__ = _RemoteTraceback(str(obj[1]))
        return error
    if isinstance(obj, (tuple, list)) and len(obj) == 3:
        type_name, message, tb_text = (str(x) for x in obj)
        err = RemoteTaskError(type_name, message, tb_text)
        if tb_text:
            err.__cause__ = _RemoteTraceback(tb_text)
        return err
    return RemoteTaskError("UnknownError", repr(obj), "")


def _qualname(cls: type) -> str:
    mod = cls.__module__
    return cls.__qualname__ if mod in ("builtins", "__main__") else f"{mod}.{cls.__qualname__}"


def _safe_str(exc: BaseException) -> str:
    try:
        return error_text(exc)
    except BaseException:
        return f"<unprintable {type(exc).__name__}>"


def _type_name(value: Any) -> str:
    try:
        return type(value).__name__
    except BaseException:
        return "?"


def _format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class Caller:
    """Turns a CALLS payload into a RESULTS record.  One per worker."""

    def __init__(self, serializer: Serializer, resolver: MethodResolver, hook: Any, info: WorkerInfo) -> None:
        self.serializer = serializer
        self.resolver = resolver
        self.info = info
        self._cache: dict[str, Callable[..., Any]] = {}
        self._loads = buffer_loads(serializer)
        self._dump_parts = dump_parts(serializer)
        self._before = hook.prefork_before_call if hook.prefork_before_call.get_hookimpls() else None
        self._after = hook.prefork_after_call if hook.prefork_after_call.get_hookimpls() else None
        self.on_call: Callable[[Any], None] | None = None  #: told each task's method before it runs (the title)

    def resolve(self, method: Any) -> Callable[..., Any]:
        return resolve_method(self.resolver, method, self._cache)

    def call(self, tid: int, payload: Any) -> tuple[Any, ...]:
        """Run one task; returns its result record as (header, payload)."""
        ser = self.serializer
        t0 = time.monotonic()
        try:
            method, args, kwargs = self._loads(payload)
            fn = self.resolve(method)
            if self.on_call is not None:
                self.on_call(method)
            if self._before is not None:
                self._before(worker=self.info, task_id=tid, method=method, args=args, kwargs=kwargs)
            t0 = time.monotonic()
            value = fn(*args, **kwargs) if kwargs else fn(*args)
            t1 = time.monotonic()
            if self._after is not None:
                self._after(worker=self.info, task_id=tid, method=method, ok=True, result=value, args=args, kwargs=kwargs)
        except BaseException as exc:  # SystemExit in a task fails the task, not the worker
            t1 = time.monotonic()
            if self._after is not None:
                try:
                    self._after(
                        worker=self.info, task_id=tid, method=locals().get("method"), ok=False, result=exc,
                        args=locals().get("args", ()), kwargs=locals().get("kwargs", {}),
                    )
                except Exception:
                    pass
            return _record(tid, _frames.ERROR, t0, t1, encode_error(ser, exc, _format_tb(exc)))
        try:
            parts = self._dump_parts(value)
        except BaseException as exc:  # the serializer's own error (PicklingError, even SystemExit), with a note
            exc.add_note(f"prefork: the task's result ({_type_name(value)}) could not be serialized with {ser.name!r}")
            return _record(tid, _frames.ERROR, t0, t1, encode_error(ser, exc, _format_tb(exc)))
        size = len(parts[0]) if len(parts) == 1 else sum(len(p) for p in parts)
        if size > _frames.MAX_PAYLOAD:
            too_big = ValueError(f"the task's result is {size} bytes serialized, more than the {_frames.MAX_PAYLOAD} "
                                 "bytes one result can carry")
            return _record(tid, _frames.ERROR, t0, t1, encode_error(ser, too_big, ""))
        if len(parts) == 1:
            return _frames.result_header(tid, _frames.OK, t0, t1, size), parts[0]
        return (_frames.result_header(tid, _frames.OK, t0, t1, size), *parts)


def _record(tid: int, status: int, t0: float, t1: float, payload: bytes) -> tuple[bytes, ...]:
    return _frames.result_header(tid, status, t0, t1, len(payload)), payload


def resolve_method(resolver: MethodResolver, method: Any, cache: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    """``method`` if callable, else what ``resolver`` finds for the name (remembered in ``cache``)."""
    if callable(method):
        return method  # type: ignore[no-any-return]
    if not isinstance(method, str):
        raise MethodNotFound(f"a task's method must be a callable or a name, not {type(method).__name__}")
    fn = cache.get(method)
    if fn is None:
        if is_private(method):
            raise MethodNotFound(f"no method named {method!r}: names with a part that starts with '_' are never dispatched")
        fn = resolver.resolve(method)
        if fn is None:
            raise MethodNotFound(f"no method named {method!r} (resolver {resolver.name!r})")
        cache[method] = fn
    return fn


def dump_parts(serializer: Serializer) -> Callable[[Any], list[Any]]:
    """``serializer.dumps_parts`` when it has one, else ``dumps`` as one part."""
    parts = optional.dumps_parts(serializer)
    if parts is not None:
        return parts
    dumps = serializer.dumps
    return lambda obj: [dumps(obj)]
