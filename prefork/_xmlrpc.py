"""The XML-RPC front of the dispatcher profile: :class:`XMLRPCFront` serves a
:class:`prefork.Dispatcher` over HTTP with the standard library's XML-RPC server
(importable as ``prefork.XMLRPCFront`` and ``prefork.dispatcher.XMLRPCFront``).

::

    client ──POST /RPC2──▶ _ThreadedServer (one thread per connection, at most max_connections)
                             _Handler: whole request within read_timeout, body <= max_body
                             _Forwarder: the call becomes Dispatcher.new_request(...)
    client ◀── response ───  the method's result, or an XML-RPC Fault (its error, or no answer within timeout)

It logs as ``prefork.dispatcher``.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Self
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

if TYPE_CHECKING:
    from prefork.dispatcher import Dispatcher

__all__ = ["XMLRPCFront"]

log = logging.getLogger("prefork.dispatcher")


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/", "/RPC2")
    server: _ThreadedServer

    def setup(self) -> None:
        super().setup()
        # The whole request (line, headers, body) must arrive within read_timeout: a
        # half-open or trickling client is cut off then, whatever it sends meanwhile.
        self.connection.settimeout(self.server.read_timeout)
        self._deadline = threading.Timer(self.server.read_timeout, self._cut_off)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut_off(self) -> None:
        log.debug("xmlrpc: a client took longer than %g s to send its request; closing it", self.server.read_timeout)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        length = self.headers.get("content-length")
        try:
            size = int(length) if length is not None else 0
        except ValueError:
            self.send_error(400, "bad Content-Length")
            return False
        if size > self.server.max_body:
            self.send_error(413, f"request body over {self.server.max_body} bytes")
            return False
        return True

    def decode_request_content(self, data: bytes) -> bytes | None:
        self._deadline.cancel()  # the request is in: the call itself may take its time
        return super().decode_request_content(data)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("xmlrpc: " + format, *args)


class _ThreadedServer(ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    allow_reuse_address = True
    read_timeout = 10.0
    max_connections = 64
    max_body = 10 * 2**20

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection, at most max_connections: past that a client is
        # refused at once rather than given a thread that may wait forever.
        if not self._slots.acquire(blocking=False):
            log.warning("xmlrpc: %d connections open; refusing %s", self.max_connections, client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that went away, or was cut off: nothing to print
            log.debug("xmlrpc: connection from %s ended: %r", client_address, exc)
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Forwarder:
    def __init__(self, dispatcher: Dispatcher, timeout: float | None) -> None:
        self.dispatcher = dispatcher
        self.timeout = timeout

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        import xmlrpc.client

        done = threading.Event()
        box: list[Any] = []

        def settle(request: dict[str, Any], response: Any) -> None:
            box.append(response)
            done.set()

        self.dispatcher.new_request({"method_name": method, "params": list(params), "upon_result": settle})
        if not done.wait(self.timeout):
            raise xmlrpc.client.Fault(2, f"{method}: no answer within {self.timeout} s")
        response = box[0]
        if isinstance(response, dict) and set(response) == {"error"}:
            raise xmlrpc.client.Fault(1, str(response["error"]))
        return response


class XMLRPCFront:
    """Serve a :class:`Dispatcher` over XML-RPC: each call becomes a request whose
    response is the call's return value (an error becomes an XML-RPC Fault).

    ``timeout`` bounds the wait for a call's answer; ``read_timeout`` bounds the
    time a client may take to send its whole request (a half-open or trickling
    connection is closed then); at most ``max_connections`` are served at once,
    and a client past that is refused at once; a body over ``max_body`` bytes is
    answered 413 without being read."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float | None = 60.0,
        *,
        read_timeout: float = 10.0,
        max_connections: int = 64,
        max_body: int = 10 * 2**20,
    ) -> None:
        if not read_timeout > 0:
            raise ValueError(f"XMLRPCFront: read_timeout = {read_timeout!r}: must be > 0 seconds")
        if max_connections < 1:
            raise ValueError(f"XMLRPCFront: max_connections = {max_connections!r}: must be >= 1")
        if max_body < 1:
            raise ValueError(f"XMLRPCFront: max_body = {max_body!r}: must be >= 1 byte")
        server_class = type(
            "_Server", (_ThreadedServer,),
            {"read_timeout": read_timeout, "max_connections": max_connections, "max_body": max_body},
        )
        self.server = server_class((host, port), requestHandler=_Handler, allow_none=True, logRequests=False)
        self.server.register_instance(_Forwarder(dispatcher, timeout))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/RPC2"

    def start(self) -> Self:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.server.serve_forever, name="prefork-xmlrpc", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
