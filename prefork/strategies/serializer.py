"""Serializers: how payloads become bytes and back.

A serializer is any object with ``dumps(obj) -> bytes`` and ``loads(data) -> obj``
and a ``name``.  ``objects`` says whether it can carry arbitrary Python objects
(exceptions, callables); when it cannot, prefork sends errors as plain data and
methods must be named, not passed.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import cloudpickle  # type: ignore[import-untyped]

from prefork._hooks import hookimpl


@runtime_checkable
class Serializer(Protocol):
    name: ClassVar[str]
    #: True when any picklable object (exceptions, callables) survives a round trip.
    objects: ClassVar[bool]

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


@attrs.frozen
class PickleSerializer:
    """The standard library's pickle at its highest protocol: fast, no lambdas."""

    name: ClassVar[str] = "pickle"
    objects: ClassVar[bool] = True

    def dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


@attrs.frozen
class CloudpickleSerializer:
    """pickle first, cloudpickle when pickle refuses: lambdas and closures work.

    Objects pickle by reference fast; only what plain pickle cannot do (a lambda,
    a closure, a class defined in ``__main__`` after the pool started) pays for
    cloudpickle.  ``always`` forces cloudpickle for everything.
    """

    name: ClassVar[str] = "cloudpickle"
    objects: ClassVar[bool] = True
    always: bool = attrs.field(default=False, metadata={"doc": "use cloudpickle for every payload, never plain pickle first"})

    def dumps(self, obj: Any) -> bytes:
        if not self.always:
            try:
                data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, AttributeError, TypeError):
                pass
            else:
                # A reference into __main__ may name something the workers, forked
                # earlier, do not have: cloudpickle sends those by value.
                if b"__main__" not in data:
                    return data
        return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


@attrs.frozen
class JsonSerializer:
    """JSON: plain data only (tuples arrive as lists); methods must be named."""

    name: ClassVar[str] = "json"
    objects: ClassVar[bool] = False

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    for cls in (PickleSerializer, CloudpickleSerializer, JsonSerializer):
        registry.register("serializer", cls)
