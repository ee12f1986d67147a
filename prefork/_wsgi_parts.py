"""The parts of prefork's WSGI server with no socket: ``wsgi.input`` over a body source,
``wsgi.file_wrapper``, and the response head a ``start_response`` call makes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, NamedTuple, Protocol

import h11

__all__ = ["FileWrapper", "Head", "Input", "response_head"]

#: hop-by-hop headers an application may not set (PEP 3333); Connection is allowed (``close``)
_HOP: Final = frozenset({b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade"})



class _Body(Protocol):
    def body_chunk(self) -> bytes:
        """The next piece of the request body, b"" at its end."""
        ...


class FileWrapper:
    """``wsgi.file_wrapper``: a file as an iterable of ``blksize`` blocks, closed with the body."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike, self.blksize = filelike, blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.filelike.read(self.blksize), b"")


class Input:
    """``wsgi.input``: the body, read from the socket as the app asks; past its end, b"" for ever."""

    def __init__(self, conn: _Body) -> None:
        self._conn, self._buf, self._eof = conn, bytearray(), False

    def _more(self) -> bool:
        chunk = b"" if self._eof else self._conn.body_chunk()
        self._buf += chunk
        self._eof = not chunk
        return bool(chunk)

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        while (size < 0 or len(self._buf) < size) and self._more():
            pass
        return self._take(len(self._buf) if size < 0 else size)

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        start = 0
        while (end := self._buf.find(b"\n", start)) < 0 and (limit < 0 or len(self._buf) < limit):
            start = len(self._buf)
            if not self._more():
                break
        end = len(self._buf) if end < 0 else end + 1
        return self._take(end if limit < 0 else min(end, limit))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(self)  # PEP 3333: the hint may be ignored

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class Head(NamedTuple):
    """A ``start_response`` call, checked: made into one ``h11.Response`` when it is sent,
    with the server's own fields added (h11 checks every field each time one is made)."""

    status_code: int
    reason: bytes
    fields: list[tuple[bytes, bytes]]
    has_length: bool  #: the app set Content-Length

    def response(self, *extra: tuple[bytes, bytes]) -> h11.Response:
        return h11.Response(status_code=self.status_code, reason=self.reason, headers=[*self.fields, *extra])


def response_head(status: str, headers: list[tuple[str, str]]) -> Head:
    """A ``start_response`` call's head; TypeError or ValueError naming what is wrong."""
    if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit() or status[3:4] not in ("", " "):
        raise ValueError(f"start_response: status {status!r} is not of the form '200 OK'")
    fields = []
    has_length = False
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise TypeError(f"start_response: header {item!r} is not a (str, str) tuple")
        name = item[0].lower().encode("latin-1")
        if name in _HOP:
            raise ValueError(f"start_response: {item[0]!r} is a hop-by-hop header: the server sets it, not the app")
        has_length = has_length or name == b"content-length"
        fields.append((item[0].encode("latin-1"), item[1].encode("latin-1")))
    return Head(int(status[:3]), status[4:].encode("latin-1"), fields, has_length)
