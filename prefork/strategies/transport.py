"""Transports: how frames move between the supervisor and one worker.

A transport makes a connected pair of sockets before the fork and wraps each
end in a channel.  Frames are opaque bytes to it; it must deliver each frame
whole and in order.  The supervisor's end is non-blocking: ``send`` buffers
what the socket does not take, ``flush`` continues when the socket is writable,
``read`` returns every complete frame that has arrived.  The worker's end
blocks.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs

from prefork._hooks import hookimpl
from prefork.errors import OptionError


class ParentChannel(Protocol):
    def fileno(self) -> int: ...

    def send(self, frame: bytes) -> None:
        """Queue ``frame``; write as much as the socket takes now, never block."""

    def wants_write(self) -> bool:
        """True while queued bytes wait for the socket to become writable."""

    def flush(self) -> None:
        """Write more queued bytes (the socket is writable)."""

    def read(self) -> list[bytes]:
        """Every complete frame available now; raises ``EOFError`` once the peer closed
        and every frame before the close was returned."""

    def close(self) -> None: ...


class ChildChannel(Protocol):
    def fileno(self) -> int: ...

    def send(self, frame: bytes) -> None: ...

    def recv(self) -> bytes | None:
        """The next frame, blocking; ``None`` at end of stream."""

    def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    name: ClassVar[str]

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        """A connected (supervisor end, worker end) pair, made before the fork."""

    def parent_channel(self, sock: socket.socket) -> ParentChannel: ...

    def child_channel(self, sock: socket.socket) -> ChildChannel: ...


_HEADER = struct.Struct("<Q")
_HSIZE = _HEADER.size


class FrameTooLarge(ValueError):
    pass


class _PipeParent:
    __slots__ = ("_eof", "_inbuf", "_max_frame", "_out", "_read_size", "sock")

    def __init__(self, sock: socket.socket, read_size: int, max_frame: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._inbuf = bytearray()
        self._out: deque[bytes | memoryview] = deque()
        self._read_size = read_size
        self._max_frame = max_frame
        self._eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        size = len(frame)
        if self._max_frame and size > self._max_frame:
            raise FrameTooLarge(f"a frame of {size} bytes exceeds transport.max_frame = {self._max_frame}")
        out = self._out
        if size < 65536:
            out.append(_HEADER.pack(size) + frame)
        else:  # no copy of a large payload
            out.append(_HEADER.pack(size))
            out.append(frame)
        if len(out) <= 2:
            self.flush()

    def wants_write(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        out = self._out
        while out:
            head = out[0]
            try:
                sent = self.sock.send(head)
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                out.clear()  # the worker is gone; its death is judged on read
                return
            if sent < len(head):
                out[0] = memoryview(head)[sent:]
                return
            out.popleft()

    def read(self) -> list[bytes]:
        buf = self._inbuf
        while not self._eof:
            try:
                chunk = self.sock.recv(self._read_size)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self._eof = True
                break
            buf += chunk
            if len(chunk) < self._read_size:
                break
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= _HSIZE:
            (size,) = _HEADER.unpack_from(buf, pos)
            if end - pos - _HSIZE < size:
                break
            frames.append(bytes(buf[pos + _HSIZE : pos + _HSIZE + size]))
            pos += _HSIZE + size
        if pos:
            del buf[:pos]
        if self._eof and not frames:
            raise EOFError
        return frames

    def close(self) -> None:
        self._out.clear()
        self.sock.close()


class _PipeChild:
    __slots__ = ("_buf", "_read_size", "sock")

    def __init__(self, sock: socket.socket, read_size: int) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._buf = bytearray()
        self._read_size = read_size

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        if len(frame) < 65536:
            self.sock.sendall(_HEADER.pack(len(frame)) + frame)
        else:
            self.sock.sendall(_HEADER.pack(len(frame)))
            self.sock.sendall(frame)

    def recv(self) -> bytes | None:
        buf = self._buf
        while True:
            if len(buf) >= _HSIZE:
                (size,) = _HEADER.unpack_from(buf, 0)
                if len(buf) - _HSIZE >= size:
                    frame = bytes(buf[_HSIZE : _HSIZE + size])
                    del buf[: _HSIZE + size]
                    return frame
                want = max(self._read_size, size + _HSIZE - len(buf))
            else:
                want = self._read_size
            try:
                chunk = self.sock.recv(want)
            except InterruptedError:
                continue
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk

    def close(self) -> None:
        self.sock.close()


def _positive(instance: Any, attribute: Any, value: int) -> None:
    if value < 1:
        raise OptionError(attribute.name, value, "must be >= 1")


def _non_negative(instance: Any, attribute: Any, value: int) -> None:
    if value < 0:
        raise OptionError(attribute.name, value, "must be >= 0 (0: no limit)")


@attrs.frozen
class PipeTransport:
    """A Unix socketpair per worker carrying length-prefixed frames."""

    name: ClassVar[str] = "pipe"
    read_size: int = attrs.field(default=262144, validator=_positive, metadata={"doc": "bytes asked of the socket per read"})
    max_frame: int = attrs.field(default=0, validator=_non_negative, metadata={"doc": "largest frame in bytes the supervisor sends (0: no limit)"})
    buffer_size: int = attrs.field(default=0, validator=_non_negative, metadata={"doc": "SO_SNDBUF/SO_RCVBUF for both ends (0: the system default)"})

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.buffer_size:
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.buffer_size)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.buffer_size)
        return a, b

    def parent_channel(self, sock: socket.socket) -> ParentChannel:
        return _PipeParent(sock, self.read_size, self.max_frame)

    def child_channel(self, sock: socket.socket) -> ChildChannel:
        return _PipeChild(sock, self.read_size)


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("transport", PipeTransport)
