"""Parallel::MPM::Prefork's echo server on prefork: children accept on a shared
listening socket, echo lines until "quit", tell the parent when they are busy
and idle, and yell data to it.  The parent keeps 2 to 4 idle children, at most
20 in all.

    python examples/echo_server.py [port [tick]]    # then: nc 127.0.0.1 20116

``tick`` is how often (seconds) the parent looks at its spare children; Apache
and the seed look once a second.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from prefork import mpm


def echo_server(sock: socket.socket) -> None:
    """The children's code: accept, echo, report."""
    while True:
        conn, _ = sock.accept()
        mpm.busy()  # tell parent we're busy
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                if line.startswith(b"quit"):
                    break
                conn.sendall(line)
        mpm.yell({"foo": "bar"})  # send data to parent
        mpm.idle()  # tell parent we're idle again


def mksock(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(socket.SOMAXCONN)
    return sock


def show(pid: int, data: Any, exitcode: int | None) -> None:
    print(pid, data, flush=True)


def main(port: int = 20116, tick: float = 1.0) -> int:
    server = mpm.MPM(
        min_spare_servers=2,
        max_spare_servers=4,
        start_servers=3,
        max_servers=20,
        data_hook_in_main=False,
        child_data_hook=show,
        child_sigh={"HUP": "IGNORE", "TERM INT": "DEFAULT"},
        overrides={"scaling.tick": tick},
    )
    sock = mksock(port)
    print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.done(0))
    signal.signal(signal.SIGINT, lambda signum, frame: server.done(0))
    try:
        while server.whip_kids(echo_server, [sock]):
            pass
    finally:
        if os.getpid() == server._owner:
            server.done()
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(int(args[0]) if args else 20116, float(args[1]) if len(args) > 1 else 1.0))
