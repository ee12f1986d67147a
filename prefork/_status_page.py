"""The live status page: one self-contained HTML page and the snapshot it polls.

::

    browser ──GET /────────────▶ PAGE (static: inline CSS and JS, nothing else loaded)
       │
       └─every second: GET /status.json ──▶ get_status() ──▶ JSON snapshot (prefork._status)
             │
             ▼  the page's script, in the browser
           scoreboard (one cell per worker slot, coloured by state), totals, the worker table,
           and a ring buffer of the last five minutes for three charts (inline SVG):
           busy workers, queue depth, tasks completed (and failed) per second

The page is the same bytes for every pool: the server never writes data into
HTML.  The script puts every value from the snapshot into the page as text
(``textContent``, attributes set one by one), so a method named ``<script>`` is
shown as those characters; the Content-Security-Policy runs no script but the
page's own (by hash) and lets the page reach nothing but its own server.

Served by the stdlib's ``ThreadingHTTPServer`` from a daemon thread, on
loopback unless another address is named.  On loopback, a request whose
``Host`` is not a loopback name is refused: a web page elsewhere that points a
DNS name at 127.0.0.1 cannot read the pool's status through a visitor's browser.

The page's text (style, script, body) and its CSP are in ``prefork/_status_page_html.py``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

from prefork._http_server import ServedHTTP
from prefork._status_page_html import CSP, PAGE

__all__ = ["CSP", "PAGE", "StatusPage", "check_bind", "serve_status_page"]

log = logging.getLogger("prefork.status_page")

_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, what: str) -> bool:
    """Check an address to listen on; ``True`` if it is loopback (this machine only).

    An empty host is refused: the stdlib reads it as every interface, which
    must be asked for by name (``0.0.0.0`` or ``::``)."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"{what}: host {host!r} names no address; use '127.0.0.1' (this machine only) "
                         "or '0.0.0.0' (every interface, reachable from other machines)")
    if host.lower() in _LOOPBACK_NAMES or _is_loopback_address(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"{what}: host {host!r} cannot be resolved ({exc.strerror})") from None
    return all(_is_loopback_address(str(info[4][0])) for info in infos)


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8080`` -> ``::1``)."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 get_status: Callable[[], Mapping[str, Any]], loopback: bool) -> None:
        self.address_family = family
        self.get_status = get_status
        self.loopback = loopback
        self.failing = False  #: the last get_status raised (its next failure is logged quietly)
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "prefork-status"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        host = self.headers.get("Host")
        if self.server.loopback and host is not None:
            name = _host_of(host.strip()).lower()
            if name not in _LOOPBACK_NAMES and not _is_loopback_address(name):
                self._send(HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8",
                           b"this status page answers to loopback names only (Host: 127.0.0.1, localhost or [::1])\n",
                           body)
                return
        path = urlsplit(self.path).path
        if path == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE, body)
        elif path == "/status.json":
            self._status(body)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found: try / or /status.json\n", body)

    def _status(self, body: bool) -> None:
        try:
            data = json.dumps(self.server.get_status(), allow_nan=False).encode()
        except Exception as exc:
            (log.debug if self.server.failing else log.warning)("status page: reading the pool's status failed: %r", exc)
            self.server.failing = True
            error = json.dumps({"error": f"reading the pool's status failed: {exc!r}"}).encode()
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json", error, body)
            return
        self.server.failing = False
        self._send(HTTPStatus.OK, "application/json", data, body)

    def _send(self, status: HTTPStatus, kind: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: %s %s", self.address_string(), format % args)


class StatusPage(ServedHTTP):
    """A status page being served: ``url``, ``host``, ``port``, ``close()``."""

    __slots__ = ()


def serve_status_page(get_status: Callable[[], Mapping[str, Any]], host: str = "127.0.0.1", port: int = 0) -> StatusPage:
    """Serve the live status page of the pool whose snapshot ``get_status`` returns
    (``Supervisor.status``, or a control-socket client) at ``http://host:port/``,
    from a daemon thread.  Loopback unless ``host`` names another address (then
    anyone who reaches it sees the pool: its methods, pids and counts).  ``port``
    0 picks a free port (see ``.port``)."""
    if not callable(get_status):
        raise TypeError(f"serve_status_page: get_status must be callable, not {type(get_status).__name__}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve_status_page: port = {port!r} must be an integer from 0 to 65535 (0: any free port)")
    loopback = check_bind(host, "serve_status_page")
    bind = host.strip("[]")
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    try:
        server = _Server((bind, port), family, get_status, loopback)
    except OSError as exc:
        raise OSError(exc.errno, f"serve_status_page: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    page = StatusPage(bind, server, "prefork-status-page")
    if loopback:
        log.info("status page at %s", page.url)
    else:
        log.warning("status page at %s, reachable from other machines: anyone who reaches it sees the pool", page.url)
    return page
