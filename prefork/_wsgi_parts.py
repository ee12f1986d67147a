"""The parts of prefork's WSGI server with no socket: ``wsgi.input`` over a body source,
``wsgi.file_wrapper``, and the response head a ``start_response`` call makes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final, NamedTuple, Protocol

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
    """A ``start_response`` call, checked once: the status line and the app's fields as bytes,
    ready to be sent with the server's own fields (``encode``)."""

    status_code: int
    line: bytes  #: b"HTTP/1.1 200 OK\r\n"
    fields: bytes  #: the app's header lines, each ending in CRLF
    length: int | None  #: the app's Content-Length, if it set one
    closes: bool  #: the app said Connection: close: the connection ends with this response

    def encode(self, extra: bytes = b"") -> bytes:
        """The whole head: status line, the app's fields, ``extra`` (lines ending in CRLF), CRLF."""
        return b"".join((self.line, self.fields, extra, b"\r\n"))


#: a field name is a token (RFC 9110, 5.6.2)
_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
#: a field value: visible characters and obs-text, spaces and tabs only between them (RFC 9110, 5.5)
_VALUE: Final = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
#: a reason phrase: tabs, spaces, visible characters, obs-text (RFC 9112, 4)
_REASON: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def response_head(status: str, headers: list[tuple[str, str]]) -> Head:
    """A ``start_response`` call's head; TypeError or ValueError naming what is wrong.  What
    could split the head (CR, LF, NUL, anything not allowed in a field) is refused here."""
    if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit() or status[3:4] not in ("", " "):
        raise ValueError(f"start_response: status {status!r} is not of the form '200 OK'")
    code = int(status[:3])
    if code < 200:
        raise ValueError(f"start_response: status {status!r} is not a final status (200 to 999)")
    try:
        reason = status[4:].encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"start_response: status {status!r} is not latin-1") from None
    if not _REASON.fullmatch(reason):
        raise ValueError(f"start_response: status {status!r} has a character a status line may not hold")
    lines = []
    length = None
    closes = False
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise TypeError(f"start_response: header {item!r} is not a (str, str) tuple")
        try:
            name, value = item[0].encode("latin-1"), item[1].encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"start_response: header {item!r} is not latin-1") from None
        lower = name.lower()
        if lower in _HOP:
            raise ValueError(f"start_response: {item[0]!r} is a hop-by-hop header: the server sets it, not the app")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"start_response: header name {item[0]!r} is not a token (RFC 9110)")
        if not _VALUE.fullmatch(value):
            raise ValueError(f"start_response: header {item[0]!r} has a value a field may not hold: {item[1]!r}")
        if lower == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise ValueError(f"start_response: Content-Length {item[1]!r} is not one number of bytes")
            length = int(value)
        elif lower == b"connection":
            closes = closes or any(token.strip() == b"close" for token in value.lower().split(b","))
        lines.append(b"%s: %s\r\n" % (name, value))
    return Head(code, b"HTTP/1.1 %d %s\r\n" % (code, reason), b"".join(lines), length, closes)
