"""A prefork plugin adding a serializer: pickle, zlib-compressed when that pays.

The ``zpickle`` serializer pickles with the standard library, so it carries
what the built-in ``pickle`` serializer carries (exceptions, classes, functions
of a module; not lambdas), and compresses the pickle with zlib when it is at
least ``min_size`` bytes and shrinks.  It suits large, repetitive payloads
(text, lists of records).

Each payload starts with one flag byte: ``0`` for a plain pickle, ``1`` for a
zlib-compressed one.

Use it from ``prefork.toml``::

    plugins = ["examples.plugin_zpickle_serializer"]

    [serializer]
    name = "zpickle"
    level = 1
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any, ClassVar

import attrs

from prefork import hookimpl
from prefork.errors import OptionError

_PLAIN = b"\x00"
_ZLIB = b"\x01"


def _level(instance: Any, attribute: attrs.Attribute[int], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= 9:
        raise OptionError(attribute.name, value, "must be an integer from -1 (zlib's default) to 9")


def _min_size(instance: Any, attribute: attrs.Attribute[int], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OptionError(attribute.name, value, "must be an integer >= 0")


@attrs.frozen
class ZpickleSerializer:
    """pickle at its highest protocol, zlib-compressed when that makes it smaller."""

    name: ClassVar[str] = "zpickle"
    #: any picklable object survives a round trip: a task's exception keeps its type
    objects: ClassVar[bool] = True
    #: loads() accepts any bytes-like object: prefork passes views into the frame, not copies
    takes_buffers: ClassVar[bool] = True
    level: int = attrs.field(
        default=6,
        validator=_level,
        metadata={"doc": "zlib compression level, 0 (none) to 9 (smallest); -1: zlib's default"},
    )
    min_size: int = attrs.field(
        default=4096, validator=_min_size, metadata={"doc": "pickles shorter than this many bytes go uncompressed"}
    )

    def dumps_parts(self, obj: Any) -> list[bytes]:
        # The flag byte and the pickle as two parts, sent one after the other:
        # a large pickle is not copied just to put one byte in front of it.
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        if len(data) >= self.min_size:
            packed = zlib.compress(data, self.level)
            if len(packed) < len(data):
                return [_ZLIB, packed]
        return [_PLAIN, data]

    def dumps(self, obj: Any) -> bytes:
        return b"".join(self.dumps_parts(obj))

    def loads(self, data: bytes | bytearray | memoryview) -> Any:
        # ``data`` may be a view into a buffer the channel reuses: read it now and
        # keep nothing of it.  pickle.loads and zlib.decompress build new objects.
        flag = bytes(data[:1])
        body = memoryview(data)[1:]  # no copy of the payload
        if flag == _PLAIN:
            return pickle.loads(body)
        if flag == _ZLIB:
            return pickle.loads(zlib.decompress(body))
        raise ValueError(f"zpickle: a payload with an unknown flag byte {flag!r} (was it made by another serializer?)")


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("serializer", ZpickleSerializer)
