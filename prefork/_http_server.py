"""An HTTP server a pool runs in a daemon thread (the metrics endpoint, the status
page): where it listens, its descriptor (which a forked process closes), and a
close that stops it and frees the port, once."""

from __future__ import annotations

import socketserver
import threading
from typing import Any

from prefork._threads import join_thread


class ServedHTTP:
    """An HTTP server being served by its own thread: ``url``, ``host``, ``port``, ``close()``."""

    __slots__ = ("_lock", "_server", "_thread", "host", "port")

    path = "/"  #: the page ``url`` names

    def __init__(self, host: str, server: socketserver.BaseServer, name: str) -> None:
        self.host = host
        self.port = int(server.server_address[1])  # type: ignore[index]
        self._server: Any = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"{name}:{self.port}", daemon=True)
        self._lock = threading.Lock()
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def fileno(self) -> int:
        """The listening socket (-1 once closed): a process forked from this one should close it."""
        server = self._server
        return int(server.fileno()) if server is not None else -1

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        join_thread(self._thread, 5)
        self._closed()

    def _closed(self) -> None:
        """What a subclass undoes once the server is gone."""

    def __enter__(self) -> ServedHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}{' closed' if self._server is None else ''}>"


__all__ = ["ServedHTTP"]
