"""Serializers: how payloads become bytes and back.

A serializer is any object with ``dumps(obj) -> bytes`` and ``loads(data) -> obj``
and a ``name``.  ``objects`` says whether it can carry arbitrary Python objects
(exceptions, callables); when it cannot, prefork sends errors as plain data and
methods must be named, not passed.  ``takes_buffers = True`` (optional) says that
``loads`` accepts any bytes-like object: payloads then reach it as views into the
received frame, not copies; without it ``loads`` always gets ``bytes``.
"""

from __future__ import annotations

import json
import pickle
import sys
import threading
from collections.abc import Callable
from types import FunctionType
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import cloudpickle  # type: ignore[import-untyped]

from prefork._hooks import hookimpl


@runtime_checkable
class Serializer(Protocol):
    """How payloads become bytes and back (docs/plugins.md, section 5).

    Optional extras: ``takes_buffers`` (true: ``loads`` accepts any bytes-like
    object, so payloads reach it as views into the received frame, not copies) and
    ``dumps_parts(obj)``, which returns the bytes as a list of parts that are sent
    one after the other (large blobs left as they are, never joined); prefork uses
    it when present."""

    name: ClassVar[str]
    #: True when any picklable object (exceptions, callables) survives a round trip.
    objects: ClassVar[bool]

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


Part = bytes | bytearray | memoryview


_MakePickler = Callable[[Any, int], pickle.Pickler]


class _Out:
    __slots__ = ("write",)
    write: Callable[[Any], Any]


class _PartsPickler:
    """One reusable C pickler writing into a list, so that large ``bytes``,
    ``bytearray`` and protocol-5 buffers (NumPy arrays) arrive as their own parts,
    the caller's objects themselves, not copies (pickle streams blobs of 64 KiB and
    more straight to ``write``).  It is as fast as ``pickle.dumps`` for small
    objects.  Used by one thread at a time; another thread, or a ``__reduce__``
    that pickles again, gets a fresh pickler."""

    __slots__ = ("_lock", "_make", "_parts", "_pickler")

    def __init__(self, make: _MakePickler = pickle.Pickler) -> None:
        self._parts: list[Part] = []
        out = _Out()
        out.write = self._parts.append
        self._make = make
        self._pickler = make(out, pickle.HIGHEST_PROTOCOL)
        self._lock = threading.Lock()

    def dump(self, obj: Any) -> list[Part]:
        if not self._lock.acquire(blocking=False):
            return _fresh_parts(obj, self._make)
        written = self._parts
        try:
            self._pickler.dump(obj)
            # the common case, one small part, without _owned's loop
            parts: list[Part] = [written[0]] if len(written) == 1 and type(written[0]) is bytes else _owned(written)
        finally:
            written.clear()
            self._pickler.clear_memo()
            self._lock.release()
        return parts


def _fresh_parts(obj: Any, pickler: _MakePickler = pickle.Pickler) -> list[Part]:
    parts: list[Part] = []
    out = _Out()
    out.write = parts.append
    pickler(out, pickle.HIGHEST_PROTOCOL).dump(obj)
    return _owned(parts)


def _owned(parts: list[Any]) -> list[Part]:
    """The parts, each an immutable ``bytes``: a blob streamed from a mutable object
    (a ``bytearray``, a NumPy array's buffer) is copied, so that changing the object
    after ``submit`` cannot change the task; ``bytes`` are shared, never copied."""
    return [p if type(p) is bytes else bytes(p) for p in parts]


def _join(parts: list[Part]) -> bytes:
    return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)


def _names_main(parts: list[Part]) -> bool:
    """Whether the pickle refers to ``__main__``; blobs (large parts) are data, not looked at."""
    if len(parts) == 1:  # the common case, without a generator
        return len(parts[0]) < 65536 and b"__main__" in parts[0]
    return any(b"__main__" in part for part in parts if len(part) < 65536)


def _main_snapshot() -> dict[str, Any]:
    """The functions and classes ``__main__`` holds now, by name: a worker forked from
    now on inherits each of them under the same name."""
    main = sys.modules.get("__main__")
    return {
        name: obj
        for name, obj in list(vars(main).items() if main is not None else ())
        if isinstance(obj, (FunctionType, type))
        and getattr(obj, "__module__", None) == "__main__"
        and getattr(obj, "__qualname__", None) == name
    }


class _ByValue(Exception):
    """A function or class of ``__main__`` that the workers may not have."""


class _InheritedMainPickler(pickle.Pickler):
    """Plain C pickle that lets a reference into ``__main__`` through only when it
    names a function or class the workers inherited at fork (the same object, under
    the same name); anything else in ``__main__`` raises ``_ByValue``.
    ``reducer_override`` runs for functions, classes and instances of user classes
    only, so this costs a Python call per such object, nothing per int or str."""

    inherited: dict[str, Any] = {}

    def reducer_override(self, obj: Any) -> Any:
        if (
            isinstance(obj, (FunctionType, type))
            and getattr(obj, "__module__", None) == "__main__"
            and self.inherited.get(getattr(obj, "__qualname__", "")) is not obj
        ):
            raise _ByValue
        return NotImplemented


def _inherited_main_pickler(inherited: dict[str, Any]) -> _MakePickler:
    def make(out: Any, protocol: int) -> pickle.Pickler:
        pickler = _InheritedMainPickler(out, protocol)
        pickler.inherited = inherited
        return pickler

    return make


@attrs.frozen
class PickleSerializer:
    """The standard library's pickle at its highest protocol: fast, no lambdas."""

    name: ClassVar[str] = "pickle"
    objects: ClassVar[bool] = True
    takes_buffers: ClassVar[bool] = True
    _pickler: _PartsPickler = attrs.field(init=False, factory=_PartsPickler, repr=False, eq=False)

    def dumps(self, obj: Any) -> bytes:
        return _join(self._pickler.dump(obj))

    def dumps_parts(self, obj: Any) -> list[Part]:
        return self._pickler.dump(obj)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


@attrs.frozen
class CloudpickleSerializer:
    """pickle first, cloudpickle when pickle refuses: lambdas and closures work.

    Objects pickle by reference fast; only what plain pickle cannot do (a lambda,
    a closure, a function or class defined in ``__main__`` after the pool was
    made) pays for cloudpickle.  A function or class that ``__main__`` held when
    the pool was made goes by reference too, as with ``multiprocessing``: the
    workers, forked later, have it, with the module globals of that moment (a
    script's big global is never copied into every task).  ``always`` forces
    cloudpickle for everything, which sends ``__main__`` functions by value with
    the current values of the globals they use.
    """

    name: ClassVar[str] = "cloudpickle"
    objects: ClassVar[bool] = True
    takes_buffers: ClassVar[bool] = True
    always: bool = attrs.field(default=False, metadata={"doc": "use cloudpickle for every payload, never plain pickle first"})
    _pickler: _PartsPickler = attrs.field(init=False, factory=_PartsPickler, repr=False, eq=False)
    # made with the pool, before its workers are forked: what they are sure to inherit
    _main_pickler: _PartsPickler = attrs.field(
        init=False, factory=lambda: _PartsPickler(_inherited_main_pickler(_main_snapshot())), repr=False, eq=False)

    def dumps(self, obj: Any) -> bytes:
        return _join(self.dumps_parts(obj))

    def dumps_parts(self, obj: Any) -> list[Part]:
        if not self.always:
            try:
                parts = self._pickler.dump(obj)
            except (pickle.PicklingError, AttributeError, TypeError):
                pass
            else:
                if not _names_main(parts):
                    return parts
                # A reference into __main__ may name something the workers, forked
                # earlier, do not have: cloudpickle sends those by value.
                try:
                    return self._main_pickler.dump(obj)
                except _ByValue:
                    pass
        return _fresh_parts(obj, cloudpickle.Pickler)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


@attrs.frozen
class JsonSerializer:
    """JSON: plain data only (tuples arrive as lists); methods must be named."""

    name: ClassVar[str] = "json"
    objects: ClassVar[bool] = False
    allow_nan: bool = attrs.field(
        default=True, metadata={"doc": "false: NaN and infinities are refused, as standard JSON (other languages) wants"}
    )

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=self.allow_nan).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    for cls in (PickleSerializer, CloudpickleSerializer, JsonSerializer):
        registry.register("serializer", cls)
