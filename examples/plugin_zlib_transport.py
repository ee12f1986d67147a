"""A prefork plugin adding a transport that zlib-compresses its frames.

The ``zlib`` transport is the built-in ``pipe`` transport (a Unix socketpair
carrying length-prefixed frames) with each frame compressed on the way in and
decompressed on the way out.  It subclasses :class:`PipeTransport`, so it keeps
the pipe's options (``read_size``, ``max_frame``, ``buffer_size``) and its
framing, and wraps the pipe's two channels.

Each frame on the wire starts with one flag byte: ``0`` for a frame sent as is,
``1`` for a zlib stream.  Frames shorter than ``min_size``, and frames that do
not shrink (already compressed data, random bytes), go as is.  ``max_frame``
limits the frame on the wire, after compression.

Use it from ``prefork.toml``::

    plugins = ["examples.plugin_zlib_transport"]

    [transport]
    name = "zlib"
    level = 1

or in code: ``build_plugin_manager(plugins=[plugin_zlib_transport])``.
"""

from __future__ import annotations

import socket
import zlib
from typing import Any, ClassVar

import attrs

from prefork import hookimpl
from prefork.errors import OptionError
from prefork.strategies.transport import ChildChannel, ParentChannel, PipeTransport

_RAW = b"\x00"
_ZLIB = b"\x01"


def encode(frame: bytes, level: int, min_size: int) -> bytes:
    """The wire form of ``frame``: a flag byte, then the frame or its zlib stream."""
    if len(frame) >= min_size:
        packed = zlib.compress(frame, level)
        if len(packed) < len(frame):
            return _ZLIB + packed
    return _RAW + frame


def decode(wire: bytes) -> bytes:
    """The frame that :func:`encode` turned into ``wire``."""
    flag, body = wire[:1], wire[1:]
    if flag == _RAW:
        return body
    if flag == _ZLIB:
        return zlib.decompress(body)
    raise ValueError(
        f"zlib transport: a frame with an unknown flag byte {flag!r} (is the peer using the zlib transport?)"
    )


class ZlibParent:
    """The supervisor's end: non-blocking, like the pipe channel it wraps."""

    __slots__ = ("_inner", "_level", "_min_size")

    def __init__(self, inner: ParentChannel, level: int, min_size: int) -> None:
        self._inner = inner
        self._level = level
        self._min_size = min_size

    def fileno(self) -> int:
        return self._inner.fileno()

    def send(self, frame: bytes) -> None:
        # Queue the compressed frame; the pipe channel writes what the socket takes.
        self._inner.send(encode(frame, self._level, self._min_size))

    def wants_write(self) -> bool:
        return self._inner.wants_write()

    def flush(self) -> None:
        self._inner.flush()

    def read(self) -> list[bytes]:
        # The pipe channel returns whole frames only and raises EOFError at the
        # end; both carry over unchanged.
        return [decode(wire) for wire in self._inner.read()]

    def close(self) -> None:
        self._inner.close()


class ZlibChild:
    """The worker's end: blocking, like the pipe channel it wraps."""

    __slots__ = ("_inner", "_level", "_min_size")

    def __init__(self, inner: ChildChannel, level: int, min_size: int) -> None:
        self._inner = inner
        self._level = level
        self._min_size = min_size

    def fileno(self) -> int:
        return self._inner.fileno()

    def send(self, frame: bytes) -> None:
        self._inner.send(encode(frame, self._level, self._min_size))

    def recv(self) -> bytes | None:
        wire = self._inner.recv()
        return None if wire is None else decode(wire)

    def close(self) -> None:
        self._inner.close()


def _level(instance: Any, attribute: attrs.Attribute[int], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= 9:
        raise OptionError(attribute.name, value, "must be an integer from -1 (zlib's default) to 9")


def _min_size(instance: Any, attribute: attrs.Attribute[int], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OptionError(attribute.name, value, "must be an integer >= 0")


@attrs.frozen
class ZlibTransport(PipeTransport):
    """The pipe transport with zlib-compressed frames."""

    name: ClassVar[str] = "zlib"
    level: int = attrs.field(
        default=6,
        validator=_level,
        metadata={"doc": "zlib compression level, 0 (none) to 9 (smallest); -1: zlib's default"},
    )
    min_size: int = attrs.field(
        default=512, validator=_min_size, metadata={"doc": "frames shorter than this many bytes go uncompressed"}
    )

    # socketpair() is the pipe's: a connected AF_UNIX stream pair.

    def parent_channel(self, sock: socket.socket) -> ParentChannel:
        return ZlibParent(super().parent_channel(sock), self.level, self.min_size)

    def child_channel(self, sock: socket.socket) -> ChildChannel:
        return ZlibChild(super().child_channel(sock), self.level, self.min_size)


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("transport", ZlibTransport)
