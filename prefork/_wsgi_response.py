"""A WSGI response, framed by the server: ``start_response``, ``write()`` and the body
of one request, sent on its connection (``prefork/_wsgi.py``'s ``_Conn``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from prefork._wsgi_parts import Head, response_head

if TYPE_CHECKING:
    from prefork._worker import WorkerHandle
    from prefork._wsgi import _Conn

__all__ = ["DRAIN", "Response"]

DRAIN: Final = 65536  #: most unread request body read and dropped after a response, to keep the connection


class Response:
    """``start_response``, ``write()`` and the body, framed here: the head goes with the first
    block; a Content-Length kept, or chunks, or (HTTP/1.0) the connection's close ends the body."""

    def __init__(self, conn: _Conn, me: WorkerHandle | None) -> None:
        self.conn, self.me = conn, me
        self.head: Head | None = None  #: from start_response; replaceable until started
        self.length: int | None = None  #: the Content-Length the server worked out (a list body), if any
        self.started = False  #: the head is made: no other status can follow
        self.out = bytearray()  #: what is made, not sent yet
        self.left: int | None = None  #: body bytes the Content-Length still asks for (None: no length)
        self.chunked = False  #: each block goes as a chunk; a last chunk ends the body
        self.closes = False  #: the head says Connection: close

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., None]:
        if exc_info is not None:
            try:
                if self.started:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.head is not None:
            raise RuntimeError("start_response called a second time without exc_info (PEP 3333)")
        self.head = response_head(status, headers)
        return self.write

    def _start(self) -> None:
        if self.started:
            return
        if self.head is None:
            raise RuntimeError("the WSGI app gave its body (or returned) before calling start_response")
        conn, head = self.conn, self.head
        unread = conn.body_unread()
        extra = b""
        if head.status_code in (204, 304):  # no body, whatever the fields say (RFC 9110)
            self.left = 0
        elif head.length is not None:
            self.left = head.length
        elif self.length is not None:
            self.left = self.length
            extra = b"Content-Length: %d\r\n" % self.length
        elif conn.http11:
            self.chunked = True
            extra = b"Transfer-Encoding: chunked\r\n"
        else:
            self.closes = True  # an HTTP/1.0 client learns the body's end from the close
        if head.closes:  # the app said so itself
            self.closes = True
        elif (self.closes or unread or conn.client_closes or (self.me is not None and self.me.leaving)
                or conn.cfg.keepalive_timeout == 0 or conn.others_wait()):
            # a kept connection would hold this child while new clients queue
            self.closes = True
            extra += b"Connection: close\r\n"
        self.started = conn.responding = True
        self.out += head.encode(extra)

    def write(self, data: bytes) -> None:
        if type(data) is not bytes:
            raise TypeError(f"the WSGI app gave {type(data).__name__} as body, not bytes")
        if data:  # the head waits for the first non-empty block: an exc_info may still replace it
            self._start()
            if self.conn.method != "HEAD":
                if self.left is not None:
                    if len(data) > self.left:
                        raise ValueError(self._too_much(len(data)))
                    self.left -= len(data)
                self.out += b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
            self.flush()

    def _too_much(self, size: int) -> str:
        code = self.head.status_code if self.head is not None else 0
        if code in (204, 304):
            return f"a {code} response has no body, and the WSGI app gave {size} bytes"
        return f"the WSGI app gave more body than its Content-Length: {self.left} bytes were left, {size} came"

    def flush(self, end: bool = False) -> None:
        if end:
            self._start()
            if self.left and self.conn.method != "HEAD":
                raise ValueError(f"the WSGI app's body ended {self.left} bytes short of its Content-Length")
            if self.chunked and self.conn.method != "HEAD":
                self.out += b"0\r\n\r\n"
        out, self.out = self.out, bytearray()
        self.conn.send(out)
        if end:
            self.conn.answered = not self.closes

    def finish(self, result: Iterable[bytes]) -> None:
        """Send the app's body, then the end of the message."""
        head = self.head
        if isinstance(result, (list, tuple)) and head and head.length is None and all(type(b) is bytes for b in result):
            self.length = sum(map(len, result))
        for block in result:
            self.write(block)
        self.flush(end=True)
