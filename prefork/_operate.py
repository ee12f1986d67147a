"""The ways an operator reaches a running pool, as ``[control]`` asks: the
control socket (``prefork status``, ``prefork ctl``), the Prometheus endpoint
and the live status page.  All three read ``Supervisor.status()``; the control
socket also acts (``resize``, ``retire_all``, ``shutdown``).

The control socket is claimed before the pool forks anything, so a name taken
by a live pool fails the start at once; the servers start after the fork
server exists, and every descriptor they hold is one the pool's workers close
(``WorkerContext.internal_fds``).  ``close()`` runs at the pool's teardown and
removes the socket.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefork._supervisor import Supervisor


log = logging.getLogger("prefork.control")


class Endpoints:
    """The operator's endpoints of one pool (see the module text)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._control: Any = None
        self._servers: list[Any] = []  # the metrics endpoint and the status page: fileno(), close()
        self.name = ""  #: the name the control socket answers to ("": none)

    def claim(self) -> None:
        """Before any fork: the control socket's name, or a ``ConfigError`` naming who holds it."""
        sup, control = self._sup, self._sup.config.control
        if not control.enabled:
            return
        from prefork.control import ControlServer, NameTaken

        name = sup.config.name
        try:
            self._control = ControlServer(sup, name, directory=control.directory or None, timeout=control.timeout).claim()
        except NameTaken:
            if _named_by_user(sup.config):
                raise
            # a name nobody chose (a profile's, or derived from the app): this pool's own, then
            name = f"{name}-{os.getpid()}"
            self._control = ControlServer(sup, name, directory=control.directory or None, timeout=control.timeout).claim()
            log.warning("pool name %r is taken by another pool: this one's control socket is %r", sup.config.name, name)
        self.name = name
        sup.ctx.internal_fds.update(self._control.fds)

    def start(self) -> None:
        """After the fork server exists: serve the control socket, metrics and the status page."""
        sup, control = self._sup, self._sup.config.control
        if self._control is not None:
            self._control.start()
        if control.metrics_port:
            from prefork.metrics import serve_metrics  # without the extra: MissingExtra, one line

            self._add(serve_metrics(sup.status, control.metrics_port, control.metrics_addr))
        if control.http:
            from prefork._status_page import serve_status_page

            host, _, port = control.http.rpartition(":")
            self._add(serve_status_page(sup.status, host, int(port)))

    def _add(self, server: Any) -> None:
        self._servers.append(server)
        self._sup.ctx.internal_fds.add(server.fileno())

    def close(self) -> None:
        """Stop every endpoint (the socket file is removed); safe twice."""
        fds = self._sup.ctx.internal_fds
        servers, self._servers = self._servers, []
        control, self._control = self._control, None
        for server in servers:
            fds.discard(server.fileno())
            try:
                server.close()
            except Exception:
                log.exception("closing %r failed", server)
        if control is not None:
            fds.difference_update(control.fds)
            try:
                control.close()
            except Exception:
                log.exception("closing the control socket %s failed", control.path)

    @property
    def control_path(self) -> str | None:
        """The control socket's path, once claimed."""
        path = getattr(self._control, "path", None)
        return str(path) if path is not None else None


def _named_by_user(config: Any) -> bool:
    """Was the pool's name set by a config file or keyword (not a profile's default, nor derived)?"""
    source = str(config.sources.get("name", "defaults"))
    return not (source == "defaults" or source.startswith("profile ") or source == DERIVED)


#: the source of a pool name that ``prefork run``/``serve`` derived from the app
DERIVED = "derived from the app"

__all__ = ["DERIVED", "Endpoints"]
