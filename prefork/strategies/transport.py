"""Transports: how frames move between the supervisor and one worker.

A transport makes a connected pair of sockets before the fork and wraps each
end in a channel.  Frames are opaque bytes to it; it must deliver each frame
whole and in order.  The supervisor's end is non-blocking: ``send`` buffers
what the socket does not take, ``flush`` continues when the socket is writable,
``read`` returns every complete frame that has arrived.  The worker's end
blocks.
"""

from __future__ import annotations

import itertools
import mmap
import socket
import struct
from collections import deque
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

import attrs

from prefork._hooks import hookimpl
from prefork.errors import CorruptStream, FrameTooLarge, OptionError


class ParentChannel(Protocol):
    """The supervisor's end.  A channel may also offer ``send_parts(parts)``: one
    frame given as a list of bytes-like parts, written without joining them (large
    payloads are then never copied in Python).  Without it the supervisor joins.
    Frames read may be any bytes-like object (``bytes``, ``bytearray``,
    ``memoryview``); a frame needs to stay valid only until the next read, so a
    channel may receive large frames into one buffer it reuses."""

    def fileno(self) -> int: ...

    def send(self, frame: bytes) -> None:
        """Queue ``frame``; write as much as the socket takes now, never block."""

    def wants_write(self) -> bool:
        """True while queued bytes wait for the socket to become writable."""

    def flush(self) -> None:
        """Write more queued bytes (the socket is writable)."""

    def read(self) -> list[Frame]:
        """Every complete frame available now; raises ``EOFError`` once the peer closed
        and every frame before the close was returned.  Any other exception (such
        as :class:`CorruptStream`, bytes that are not frames) means the stream is
        broken: the supervisor kills that worker and settles its tasks."""

    def close(self) -> None: ...


class ChildChannel(Protocol):
    """The worker's end: whole frames, sent and received blocking."""

    def fileno(self) -> int: ...

    def send(self, frame: bytes) -> None: ...

    def recv(self) -> Frame | None:
        """The next frame, blocking; ``None`` at end of stream."""

    def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """How frames travel between the supervisor and a worker: a socket pair made
    before the fork, wrapped in a :class:`ParentChannel` in the supervisor and a
    :class:`ChildChannel` in the worker (docs/plugins.md, section 4)."""

    name: ClassVar[str]

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        """A connected (supervisor end, worker end) pair, made before the fork."""

    def parent_channel(self, sock: socket.socket) -> ParentChannel: ...

    def child_channel(self, sock: socket.socket) -> ChildChannel: ...


_HEADER = struct.Struct("<Q")
_HSIZE = _HEADER.size
#: a frame's header is one u64: this mark in its top 16 bits, the frame's length below.
#: Bytes that are not a frame (a task writing into its worker's socket) fail the check
#: instead of reading as a length of gigabytes.
_MARK: Final = 0x5046 << 48
_LENGTH: Final = (1 << 48) - 1
#: no frame is longer: one call or result record (a u32 length) and its headers
MAX_FRAME_LENGTH: Final = 2**32 + 4096
#: frames at least this large are received straight into their own buffer, and sent
#: as separate parts, never joined or copied in Python
BIG_FRAME: Final = 65536
_IOV_MAX: Final = 64  # parts per sendmsg
MAP_FRAME: Final = 4 * 2**20
KEEP_BUFFER: Final = 64 * 2**20  #: a receive buffer up to this size is kept for the next large frame
Frame = bytes | bytearray | memoryview




def _head(size: int) -> bytes:
    return _HEADER.pack(_MARK | size)


def _length(buf: bytes | bytearray | memoryview, pos: int) -> int:
    """The length in the frame header at ``pos``; ``CorruptStream`` if it is no header."""
    (word,) = _HEADER.unpack_from(buf, pos)
    size: int = word & _LENGTH
    if word & ~_LENGTH != _MARK or size > MAX_FRAME_LENGTH:
        raise CorruptStream(f"the channel carried bytes that are not a frame (header {word:#018x})")
    return size


def _buffer(size: int) -> bytearray:
    """A writable buffer for large frames.  Past a few MiB, an anonymous map: its
    pages are zeroed by the kernel as the data lands in them, where a bytearray
    would first be filled with zeros by a pass over all of it."""
    if size < MAP_FRAME:
        return bytearray(size)
    return mmap.mmap(-1, size)  # type: ignore[return-value]  # bytes-like, writable, indexable


class _Spare:
    """The one buffer a channel receives its large frames into, kept for the next:
    fresh memory costs a page fault per 4 KiB page, which is most of the price of
    a large payload.  A frame in it is valid until the channel's next read."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf: bytearray | None = None

    def take(self, size: int) -> memoryview:
        buf = self.buf
        if buf is None or len(buf) < size:
            buf = _buffer(size)
            self.buf = buf if size <= KEEP_BUFFER else None
        return memoryview(buf)[:size]


class _Scratch:
    """A channel's reusable receive buffer of ``read_size`` bytes.  ``recv(n)``
    allocates ``n`` bytes per call: with the default 256 KiB that is an mmap and
    its page faults, 20 us a read here against 3 us for ``recv_into`` this buffer."""

    __slots__ = ("view",)

    def __init__(self, size: int) -> None:
        # mmap, not bytearray(size): that would write (and fault in) every page at once
        self.view = memoryview(mmap.mmap(-1, size))


def _split(
    buf: bytearray, frames: list[Frame] | deque[Frame], spare: _Spare
) -> tuple[memoryview | None, int]:
    """Move every complete frame out of ``buf`` (one copy each) into ``frames``.

    A large frame that has only begun to arrive moves to the spare buffer,
    returned with how many of its bytes are there; the rest is received into it.
    """
    pos = 0
    end = len(buf)
    big: memoryview | None = None
    got = 0
    with memoryview(buf) as view:
        while end - pos >= _HSIZE:
            size = _length(buf, pos)
            start = pos + _HSIZE
            if end - start < size:
                if size >= BIG_FRAME:
                    got = end - start
                    big = spare.take(size)
                    big[:got] = view[start:end]
                    pos = end
                break
            frames.append(bytes(view[start : start + size]))
            pos = start + size
    if pos:
        del buf[:pos]
    return big, got


class _PipeParent:
    __slots__ = (
        "_big", "_corrupt", "_eof", "_got", "_inbuf", "_max_frame", "_out", "_read_size", "_scratch", "_spare", "sock",
    )

    def __init__(self, sock: socket.socket, read_size: int, max_frame: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._inbuf = bytearray()
        self._scratch = _Scratch(read_size)
        self._out: deque[bytes | bytearray | memoryview] = deque()
        self._read_size = read_size
        self._max_frame = max_frame
        self._eof = False
        self._corrupt: CorruptStream | None = None
        self._big: memoryview | None = None
        self._got = 0
        self._spare = _Spare()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        size = len(frame)
        if self._max_frame and size > self._max_frame:
            raise FrameTooLarge(f"a frame of {size} bytes exceeds transport.max_frame = {self._max_frame}")
        out = self._out
        if size < BIG_FRAME:
            out.append(_head(size) + frame)
        else:  # no copy of a large payload
            out.append(_head(size))
            out.append(frame)
        if len(out) <= 2:
            self.flush()

    def send_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        size = sum(len(p) for p in parts)
        if self._max_frame and size > self._max_frame:
            raise FrameTooLarge(f"a frame of {size} bytes exceeds transport.max_frame = {self._max_frame}")
        was = len(self._out)
        self._out.append(_head(size))
        self._out.extend(parts)
        if not was:
            self.flush()

    def wants_write(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        out = self._out
        sock = self.sock
        while out:
            try:
                if len(out) == 1:
                    sent = sock.send(out[0])
                else:
                    sent = sock.sendmsg(list(itertools.islice(out, _IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                out.clear()  # the worker is gone; its death is judged on read
                return
            while sent:
                head = out[0]
                n = len(head)
                if sent < n:
                    out[0] = memoryview(head)[sent:]
                    return  # the socket took what it could
                out.popleft()
                sent -= n

    def read(self) -> list[Frame]:
        buf = self._inbuf
        frames: list[Frame] = []
        sock = self.sock
        while not self._eof and self._corrupt is None:
            big = self._big
            if big is not None:  # a large frame arrives straight into the spare buffer
                try:
                    n = sock.recv_into(big[self._got :])
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionResetError:
                    n = 0
                if not n:
                    self._eof = True
                    break
                self._got += n
                if self._got == len(big):
                    frames.append(big)
                    self._big = None
                    break  # the spare is this frame's until the next read
                continue
            view = self._scratch.view
            try:
                n = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                n = 0
            if not n:
                self._eof = True
                break
            buf += view[:n]
            try:
                self._big, self._got = _split(buf, frames, self._spare)
            except CorruptStream as exc:
                self._corrupt = exc  # the frames before it are good: returned now, the error next
                buf.clear()
                break
            if n < self._read_size and self._big is None:
                break
        if not frames:
            if self._corrupt is not None:
                raise self._corrupt
            if self._eof:
                raise EOFError
        return frames

    def close(self) -> None:
        self._out.clear()
        self.sock.close()


class _PipeChild:
    __slots__ = ("_big", "_buf", "_got", "_read_size", "_ready", "_scratch", "_spare", "sock")

    def __init__(self, sock: socket.socket, read_size: int) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._buf = bytearray()
        self._scratch = _Scratch(read_size)
        self._read_size = read_size
        self._ready: deque[Frame] = deque()
        self._big: memoryview | None = None
        self._got = 0
        self._spare = _Spare()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        if len(frame) < BIG_FRAME:
            self.sock.sendall(_head(len(frame)) + frame)
        else:
            self.sock.sendall(_head(len(frame)))
            self.sock.sendall(frame)

    def send_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        todo: list[bytes | bytearray | memoryview] = [_head(sum(len(p) for p in parts)), *parts]
        sock = self.sock
        while todo:
            sent = sock.sendmsg(todo[:_IOV_MAX])
            while sent:
                n = len(todo[0])
                if sent < n:
                    todo[0] = memoryview(todo[0])[sent:]
                    break
                del todo[0]
                sent -= n

    def recv(self) -> Frame | None:
        buf = self._buf
        while True:
            if self._ready:
                return self._ready.popleft()
            if self._big is not None:
                big, self._big = self._big, None
                return self._fill(big, self._got)
            if len(buf) >= _HSIZE:
                size = _length(buf, 0)
                if len(buf) - _HSIZE >= size or size >= BIG_FRAME:
                    self._big, self._got = _split(buf, self._ready, self._spare)
                    continue
            view = self._scratch.view
            try:
                n = self.sock.recv_into(view)
            except InterruptedError:
                continue
            except ConnectionResetError:
                return None
            if not n:
                return None
            buf += view[:n]

    def _fill(self, big: memoryview, got: int) -> memoryview | None:
        """Receive the rest of a large frame straight into the spare buffer."""
        while got < len(big):
            try:
                n = self.sock.recv_into(big[got:])
            except InterruptedError:
                continue
            except ConnectionResetError:
                return None
            if not n:
                return None
            got += n
        return big

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
