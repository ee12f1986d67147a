"""WSGI (PEP 3333) over HTTP/1.1 for ``prefork serve``, one connection at a time per child.

::

    accept (serve.py) ─► WSGIHandler(sock, addr)
      read_head: h11 events up to a Request       limits: header_timeout, max_header_bytes, max_headers,
        (400/408/413/431 answered, then closed)     max_body as declared
      busy() ─► app(environ, start_response)
        wsgi.input ◄─ h11 Data ◄─ recv            read_timeout a wait, max_body as it streams, 100 Continue
        start_response/write/body ─► send         framed here: the head with the first block; a length, chunks or the close
      the body's close(), the unread body drained, idle(): where a child leaves (SIGTERM, budget, memory)
      keep-alive: idle(keepalive=True), the scoreboard's KEEPALIVE (no spare) until the next request's
        busy(), within keepalive_timeout (a SIGTERM ends the wait); the connection's end: idle again
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from prefork._listen_queue import waiting_reader
from prefork._worker import WorkerHandle, current_worker
from prefork._wsgi_parts import FileWrapper, Input
from prefork._wsgi_response import DRAIN, Response
from prefork.config.model import MPMConfig
from prefork.errors import MissingExtra

try:
    import h11
except ImportError as exc:  # pragma: no cover - without the extra
    raise MissingExtra("prefork serve's WSGI needs h11, which is not installed: pip install 'prefork[wsgi]'",
                       name="h11") from exc

__all__ = ["FileWrapper", "RequestError", "WSGIHandler", "make_handler"]

log = logging.getLogger("prefork.serve")

_RECV: Final = 65536  #: bytes asked of one recv()
#: seconds a closing connection reads what still comes: unread bytes make the close a reset, which can lose our answer
_LINGER: Final = 2.0
class RequestError(OSError):
    """``wsgi.input`` cannot read the body; ``status`` answers it if the response has not begun:
    400 malformed, 408 a wait over read_timeout, 413 over max_body, 0 the client is gone."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _readable(fd: Any, timeout: float) -> bool:
    return _ready(fd, select.POLLIN, timeout)


def _ready(fd: Any, events: int, timeout: float | None) -> bool:
    """Wait until ``fd`` is ready for ``events`` (or has an error or hang-up); False after ``timeout`` s."""
    poll = select.poll()
    poll.register(fd, events)
    return bool(poll.poll(None if timeout is None else timeout * 1000))


def _unread(sock: socket.socket) -> bool:
    """Has the client sent bytes not read yet?  (Its end of stream is none: nothing to drain.)"""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing there; others: the connection is gone
        return False


class _Conn:
    """One client connection: its socket, its h11 state, the limits, and what went wrong."""

    def __init__(self, sock: socket.socket, addr: Any, cfg: MPMConfig, here: Any = None) -> None:
        self.sock, self.cfg = sock, cfg
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_header_bytes)
        self.timeout = cfg.read_timeout or None
        self.problem: RequestError | None = None  #: the client failed us: timeout, gone, bad body, too large
        self.linger = False  #: a refusal was sent: read what the client still sends before closing
        self.declared: int | None = 0  #: the request's Content-Length (None: chunked)
        self.received = 0  #: body bytes read of this request
        self.others_wait: Callable[[], bool] = _nobody  #: do connections wait for a child? (then no keep-alive)
        self.client_closes = False  #: the request said Connection: close (or is HTTP/1.0): it is the last
        self.http11 = True  #: the request is HTTP/1.1 (a body of unknown length can be chunked)
        self.continued = False  #: 100 Continue went out for this request
        self.responding = False  #: this request's response has begun: no refusal can replace it
        self.answered = False  #: this request's response went out whole, without Connection: close
        if here is None:  # the listener's address, when it is one address (else this connection's)
            here = sock.getsockname() if sock.family in (socket.AF_INET, socket.AF_INET6) else ("localhost", 0)
        peer = addr if isinstance(addr, tuple) else ("", 0)
        self.client = f"{peer[0]}:{peer[1]}"
        self.base: dict[str, Any] = {
            "SCRIPT_NAME": "", "SERVER_NAME": str(here[0]), "SERVER_PORT": str(here[1]),
            "REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1]), "CONTENT_TYPE": "", "CONTENT_LENGTH": "",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": False,
            "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
        }  # fmt: skip

    def _recv(self, timeout: float | None, size: int = _RECV) -> int:
        """Give h11 what the client sent, waiting up to ``timeout`` for it (TimeoutError).
        The socket stays blocking and each call says MSG_DONTWAIT: a socket with a
        timeout would cost a poll() and an ioctl() before every recv(), data there or not."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(size, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                if not _ready(sock, select.POLLIN, timeout):
                    raise TimeoutError(f"nothing from the client within {timeout} s") from None
        self.h11.receive_data(data)
        return len(data)

    def read_head(self, deadline: float) -> h11.Request | None:
        """The next request's head by ``deadline``, within the limits; None: none (closed, or refused)."""
        cfg = self.cfg
        pending = len(self.h11.trailing_data[0])  # pipelined bytes already read
        fed = 0
        self.method = ""
        self.continued = self.responding = self.answered = False
        request = None
        try:
            while not isinstance(event := self.h11.next_event(), h11.Request):
                if event is not h11.NEED_DATA:
                    return None  # ConnectionClosed
                if (left := deadline - time.monotonic()) <= 0:
                    raise TimeoutError
                room = cfg.max_header_bytes + 1 - pending - fed  # h11 says 431 once its buffer is past the limit
                fed += self._recv(left, max(1, min(_RECV, room)))
            request, self.method = event, event.method.decode("latin-1")
            refusal = self._check(event, pending + fed - len(self.h11.trailing_data[0]))
        except TimeoutError:
            if not pending + fed:
                return None
            refusal = 408, f"no whole request line and headers within mpm.header_timeout = {cfg.header_timeout:g} s"
        except h11.RemoteProtocolError as exc:
            refusal = exc.error_status_hint, f"malformed request: {exc}"
            if exc.error_status_hint == 431:
                refusal = 431, f"request line and headers longer than mpm.max_header_bytes = {cfg.max_header_bytes}"
        except OSError:
            return None  # reset by the client
        if refusal is None:
            return request
        log.info("worker %d: %s from %s refused: %d, %s", os.getpid(), self.method or "-", self.client, *refusal)
        self.refuse(*refusal)
        return None

    def _check(self, request: h11.Request, head: int) -> tuple[int, str] | None:
        """A request head's limits: None, or the status and reason to refuse it with."""
        cfg = self.cfg
        self.received, self.declared = 0, 0
        self.http11 = request.http_version == b"1.1"
        self.client_closes = not self.http11
        if head > cfg.max_header_bytes:
            return 431, f"request line and headers of {head} bytes, over mpm.max_header_bytes = {cfg.max_header_bytes}"
        if len(request.headers) > cfg.max_headers:
            return 431, f"{len(request.headers)} header fields, more than mpm.max_headers = {cfg.max_headers}"
        for name, value in request.headers:
            if b"_" in name:
                return 400, (f"header name {name.decode('latin-1')!r} has '_': refused, as in the WSGI environ it "
                             "would read like the same name with '-'")
            if name == b"content-length":
                self.declared = int(value)
            elif name == b"transfer-encoding":
                self.declared = None
            elif name == b"connection" and any(token.strip() == b"close" for token in value.lower().split(b",")):
                self.client_closes = True
        if cfg.max_body and (self.declared or 0) > cfg.max_body:
            return 413, f"a request body of {self.declared} bytes, more than mpm.max_body = {cfg.max_body}"
        return None

    def body_chunk(self) -> bytes:
        """The next piece of the request body, b"" at its end; RequestError if it cannot be read."""
        h, limit = self.h11, self.cfg.max_body
        try:
            if self.problem is not None:
                raise self.problem
            if h.they_are_waiting_for_100_continue and not self.continued and not self.responding:
                self.continued = True
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            while not isinstance(event := h.next_event(), h11.Data) or not event.data:
                if event is h11.NEED_DATA:
                    self._recv(self.timeout)
                elif not isinstance(event, h11.Data):
                    return b""  # EndOfMessage, then PAUSED
            self.received += len(event.data)
            if limit and self.received > limit:
                raise RequestError(413, f"the request body is longer than mpm.max_body = {limit}")
            return event.data
        except RequestError as exc:
            self.problem = exc
        except TimeoutError:
            self.problem = RequestError(408, f"the client sent nothing for mpm.read_timeout = {self.timeout} s")
        except h11.RemoteProtocolError as exc:
            self.problem = RequestError(400, f"malformed request body: {exc}")
        except OSError as exc:
            self.problem = self.problem or RequestError(0, f"the client went away: {exc}")
        raise self.problem

    def send(self, out: bytes | bytearray) -> None:
        """Send; read_timeout bounds each wait (sendall's, the whole); an OSError marks the client gone."""
        data, sock = memoryview(out), self.sock
        try:
            while data:
                try:
                    data = data[sock.send(data, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    if not _ready(sock, select.POLLOUT, self.timeout):
                        raise TimeoutError(f"the client took nothing within {self.timeout} s") from None
        except OSError as exc:
            self.answered = False
            self.problem = self.problem or RequestError(
                408 if isinstance(exc, TimeoutError) else 0, f"the client did not take the response: {exc!r}")
            raise

    def refuse(self, status: int, reason: str) -> None:
        """Answer ``status``, ``reason`` as a text body, and ``Connection: close``, unless a
        response has begun (then the connection's close is all the client learns)."""
        self.linger = True
        if self.responding:
            return
        self.responding = True
        phrase = HTTPStatus(status).phrase
        body = f"{status} {phrase}: {reason}\n".encode()
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % (status, phrase.encode(), len(body)))
        try:
            self.send(head + (b"" if self.method == "HEAD" else body))
        except OSError:
            pass

    def body_unread(self) -> bool:
        """Will the request's body be left unread past what keep-alive drains (``DRAIN``)?
        (Then the response says Connection: close.)"""
        h = self.h11
        return h.their_state is h11.SEND_BODY and (
            (h.they_are_waiting_for_100_continue and not self.continued)
            or self.declared is None or self.declared - self.received > DRAIN)

    def keeps_alive(self) -> bool:
        """After a response: drop the unread body (up to DRAIN bytes), start the next cycle; False: close.

        h11 reads the requests only (prefork frames its responses): each request gets an h11
        connection of its own, given the bytes already read past the last one (pipelined)."""
        h = self.h11
        dropped = 0
        try:
            while self.answered and h.their_state is h11.SEND_BODY and self.problem is None:
                event = h.next_event()
                if event is h11.NEED_DATA and (dropped > DRAIN or not self._recv(self.timeout)):
                    return False
                dropped += len(event.data) if isinstance(event, h11.Data) else 0
        except (h11.RemoteProtocolError, OSError):
            return False
        if not self.answered or h.their_state is not h11.DONE:
            return False
        data, closed = h.trailing_data
        self.h11 = h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.cfg.max_header_bytes)
        if data:
            h.receive_data(data)
        if closed:
            h.receive_data(b"")
        return True

    def close(self) -> None:
        """Close; first, if the client may still be sending, shut our side and read it out (_LINGER)."""
        sock = self.sock
        if sock.fileno() < 0:
            return
        try:
            # a client that said Connection: close sends nothing after its request: no peek for more
            if self.linger or not self._request_read() or (not self.client_closes and _unread(sock)):
                sock.shutdown(socket.SHUT_WR)
                end = time.monotonic() + _LINGER
                while (left := end - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not sock.recv(_RECV):
                        break
        except OSError:
            pass
        sock.close()

    def _request_read(self) -> bool:
        """Has the client's request been read to its end?  A bodiless request's end is
        already in h11's buffer (a ``Connection: close`` response never asks for it):
        True then, so close() does not wait for the client's FIN.  False while a body
        may still be coming, or the request was broken."""
        h = self.h11
        try:
            while h.their_state is h11.SEND_BODY:
                if h.next_event() is h11.NEED_DATA:  # what is buffered only: no recv
                    return False
        except h11.RemoteProtocolError:
            return False
        return h.their_state is not h11.ERROR

    def environ(self, request: h11.Request) -> dict[str, Any]:
        env = self.base.copy()
        path, _, query = request.target.partition(b"?")
        if not path.startswith(b"/") and b"://" in path:  # absolute form: http://host/path
            path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
        env.update(REQUEST_METHOD=self.method, PATH_INFO=unquote_to_bytes(path).decode("latin-1"),
                   QUERY_STRING=query.decode("latin-1"), SERVER_PROTOCOL="HTTP/" + request.http_version.decode())
        for name, value in request.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
                if key in env:  # several fields of one name are one value, as RFC 9110 joins them
                    value = env[key].encode("latin-1") + (b"; " if key == "HTTP_COOKIE" else b",") + value
            env[key] = value.decode("latin-1")
        env["wsgi.input"] = Input(self)
        return env


class WSGIHandler:
    """``handle(conn, addr)`` for ``prefork serve``: the requests of one connection, each
    between ``busy()`` and ``idle()`` (``idle(keepalive=True)`` while the connection stays
    open for another); made in the parent, called in the children."""

    def __init__(self, app: Callable[..., Iterable[bytes]], cfg: MPMConfig) -> None:
        self.app, self.cfg = app, cfg
        #: readable when a signal came (serve.py's wakeup pipe): a SIGTERM ends a keep-alive wait
        self.wakeup_fd = -1
        #: the listening socket: while connections wait in its queue, responses close their connection
        self.listener: socket.socket | None = None
        self._waiting: Callable[[], bool] | None = None
        self._here: Any = None  # the listener's (host, port) when it has one address, for SERVER_NAME/PORT

    def __call__(self, sock: socket.socket, addr: Any) -> None:
        me = current_worker()
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no wait for an ACK between responses
        sock.settimeout(None)  # blocking: _Conn waits itself, and only when there is nothing to read or no room
        if self._waiting is None:  # once per child: how to see connections queue behind this one
            self._waiting = (waiting_reader(self.listener) if self.listener is not None else None) or _nobody
            self._here = _one_address(self.listener)
        conn = _Conn(sock, addr, self.cfg, self._here)
        conn.others_wait = self._waiting
        try:
            while (request := conn.read_head(time.monotonic() + self.cfg.header_timeout)) is not None:
                if not self._serve(conn, request, me):
                    break
                os.sched_yield()  # between two requests, as between two connections: see serve.py
                if not self._wait(conn, me):
                    break
        finally:
            conn.close()
            if me is not None:  # a kept-alive connection ended: idle, back to accept (serve.py leaves if asked)
                me._end_keepalive()

    def _serve(self, conn: _Conn, request: h11.Request, me: WorkerHandle | None) -> bool:
        """One request, then idle() (keepalive while the connection takes another), where the
        child may leave; True: the connection takes another."""
        env = conn.environ(request)
        response = Response(conn, me)
        if me is not None:
            me.busy()
        result: Any = None
        try:
            result = self.app(env, response.start_response)
            response.finish(result)
        except Exception as exc:
            self._failed(conn, response, env, exc)
        finally:
            if hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    log.exception("worker %d: the close() of the WSGI app's body raised on %s %s",
                                  os.getpid(), env["REQUEST_METHOD"], env["PATH_INFO"])
        keep = conn.keeps_alive()
        if me is not None:
            if not keep:
                conn.close()
            try:
                me.idle(keepalive=keep)  # leaves here (SystemExit) when it must: between two requests
            except SystemExit:
                conn.close()
                raise
        return keep

    def _failed(self, conn: _Conn, response: Response, env: dict[str, Any], exc: Exception) -> None:
        method, path = env["REQUEST_METHOD"], env["PATH_INFO"]
        if (problem := conn.problem) is not None:  # a slow, broken or vanished client is no app error
            (log.warning if problem.status == 408 else log.info)(
                "worker %d: %s %s from %s: %s; closed", os.getpid(), method, path, conn.client, problem)
            if problem.status and not response.started:
                conn.refuse(problem.status, str(problem))
            return
        answer = "the response had begun: the connection is closed" if response.started else "answered 500"
        log.error("worker %d: the WSGI app raised on %s %s from %s; %s", os.getpid(), method, path, conn.client,
                  answer, exc_info=exc, extra={"method": method, "path": path})
        if not response.started:
            conn.refuse(500, "the application failed (its traceback is in the server's log)")

    def _wait(self, conn: _Conn, me: WorkerHandle | None) -> bool:
        """Wait for a kept-alive connection's next request: False after keepalive_timeout or a SIGTERM."""
        if conn.h11.trailing_data[0]:
            return True  # pipelined
        poll = select.poll()
        poll.register(conn.sock, select.POLLIN)
        if self.wakeup_fd >= 0:
            poll.register(self.wakeup_fd, select.POLLIN)
        end = time.monotonic() + self.cfg.keepalive_timeout
        while (left := end - time.monotonic()) > 0:
            if me is not None and me.leaving:  # a request already here is served, with Connection: close
                return _readable(conn.sock, 0)
            for fd, _ in poll.poll(left * 1000):
                if fd != self.wakeup_fd:
                    return True
                os.read(fd, 512)
        return False


def _one_address(listener: socket.socket | None) -> Any:
    """The listener's (host, port) if every connection it accepts has that local address
    (it is bound to one IP address); None: each connection's own (a wildcard, a path)."""
    if listener is None or listener.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    here = listener.getsockname()
    return None if ipaddress.ip_address(here[0].split("%")[0]).is_unspecified else here[:2]


def _nobody() -> bool:
    return False


def make_handler(app: Callable[..., Iterable[bytes]], mpm_config: MPMConfig) -> Callable[[socket.socket, Any], None]:
    """``handle(conn, addr)`` serving the WSGI ``app`` over HTTP/1.1 within ``mpm_config``'s limits."""
    return WSGIHandler(app, mpm_config)
