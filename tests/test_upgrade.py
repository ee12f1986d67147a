"""Zero-downtime upgrades, the parts (``prefork._upgrade``): a new master started with the
listening socket and a ready pipe; ready, failed by exit, failed by timeout; the socket
taken over and checked."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time

import pytest

from prefork._upgrade import LISTEN_FD, Successor, announce_ready, inherited_listener, ready_fd
from prefork.errors import ConfigError

NEW_MASTER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from prefork._upgrade import announce_ready, inherited_listener, ready_fd
    listener = inherited_listener()
    fd = ready_fd()
    assert os.environ.get("PREFORK_LISTEN_FD") is None and os.environ.get("PREFORK_READY_FD") is None
    assert announce_ready(fd)
    conn, _ = listener.accept()
    conn.sendall(b"new master %d\\n" % os.getpid())
    conn.close()
    """
).format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_state(successor: Successor, timeout: float = 15.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = successor.state()
        if state != "booting":
            return state
        time.sleep(0.01)
    return "booting"


def test_a_new_master_takes_the_socket_says_ready_and_serves_on_it() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    successor = Successor.start(listener, boot_timeout=15, argv=[sys.executable, "-c", NEW_MASTER])
    try:
        assert wait_state(successor) == "ready", successor.why
        listener.close()  # the old master lets go: the socket lives on in the new one
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            assert c.makefile().readline() == f"new master {successor.pid}\n"
        assert successor.proc.wait(timeout=10) == 0
    finally:
        if successor.proc.poll() is None:
            successor.proc.kill()
            successor.proc.wait()


def test_a_new_master_that_exits_before_it_is_ready_has_failed_and_says_how() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    successor = Successor.start(listener, boot_timeout=15, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    assert wait_state(successor) == "failed"
    assert "exit code 3" in successor.why
    listener.close()


def test_a_new_master_that_never_gets_ready_is_killed_after_boot_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    successor = Successor.start(listener, boot_timeout=0.5, argv=[sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    assert wait_state(successor) == "failed"
    assert 0.4 < time.monotonic() - t0 < 10
    assert "not ready within pool.boot_timeout" in successor.why
    assert successor.proc.poll() is not None
    listener.close()


def test_no_upgrade_no_inherited_socket_and_nobody_to_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LISTEN_FD, raising=False)
    monkeypatch.delenv("PREFORK_READY_FD", raising=False)
    assert inherited_listener() is None
    assert ready_fd() == -1 and announce_ready(-1) is False


@pytest.mark.parametrize("value", ["x", "999"])
def test_an_inherited_socket_that_is_not_ours_is_refused_in_one_line(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LISTEN_FD, value)
    with pytest.raises(ConfigError, match=f"PREFORK_LISTEN_FD='{value}'"):
        inherited_listener()


def test_an_inherited_socket_that_does_not_listen_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    monkeypatch.setenv(LISTEN_FD, str(a.fileno()))
    with pytest.raises(ConfigError, match="is not a listening socket"):
        inherited_listener()
    a.close()
    b.close()
