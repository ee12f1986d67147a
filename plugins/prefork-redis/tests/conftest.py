"""A real ``redis-server`` for the session, one of its own for a test that kills it, and a
fresh app (fresh keys) per test.

The session server listens on a free loopback port, keeps nothing on disk and
is stopped by pid at the end (SIGTERM, then SIGKILL, then waitpid).  A test
that kills, restarts or freezes Redis asks for ``own_redis(persist=...)``: a
server of its own on another free port, with AOF (``appendfsync always``) or
no persistence at all, restarted on the same port.  Without ``redis-server``
the broker tests are skipped, or fail when ``CI`` is set.  Every test fails if
it leaves a process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork.testing import leaked_processes, present_processes

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install ./plugins/prefork-redis)")
pytest.importorskip("prefork_redis", reason="prefork-redis is not installed (pip install ./plugins/prefork-redis)")

from prefork_redis.broker import Broker  # noqa: E402
from redis_support import SECRET  # noqa: E402

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    before = present_processes()
    yield
    leaks = leaked_processes(before)
    assert not leaks, "processes left behind (live or zombie):\n" + "\n".join(leaks)


@pytest.fixture(autouse=True)
def _no_secret_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are given explicitly here; one in the environment would hide a missing one."""
    monkeypatch.delenv("PREFORK_REDIS_SECRET", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _launch(exe: str, workdir: Path, port: int, persist: bool) -> tuple[subprocess.Popen[bytes] | None, str]:
    """Start a server on ``port`` and wait (bounded) until it answers PING: (process, '') or (None, its log)."""
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    log = workdir / f"redis-{port}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability, "--dir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    return proc, ""
            except (redis.ConnectionError, redis.TimeoutError):  # refused, or LOADING the AOF
                time.sleep(0.02)
    finally:
        client.close()
    _stop(proc)
    return None, log.read_text(errors="replace")[-2000:]


def _start(exe: str, workdir: Path, persist: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server on a free port; retry on a port lost to a race."""
    last = ""
    for _attempt in range(3):
        port = _free_port()
        proc, last = _launch(exe, workdir, port, persist)
        if proc is not None:
            return proc, port
    pytest.fail(f"redis-server did not answer PING within {START_TIMEOUT} s; its log:\n{last}")


def _redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        why = "redis-server is not installed (apt-get install redis-server): the broker tests need a real server"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return exe


class OwnRedis:
    """A redis-server of one test's own, to kill, restart on the same port, or freeze."""

    def __init__(self, exe: str, workdir: Path, persist: bool) -> None:
        self.exe, self.workdir, self.persist = exe, workdir, persist
        self.proc, self.port = _start(exe, workdir, persist)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer: nothing flushed that was not already."""
        self.thaw()
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Start again on the same port (reading the AOF back, when it has one)."""
        proc, log = _launch(self.exe, self.workdir, self.port, self.persist)
        if proc is None:
            pytest.fail(f"redis-server did not come back on port {self.port}; its log:\n{log}")
        self.proc = proc

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        _stop(self.proc)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., OwnRedis]]:
    """``own_redis(persist=True)``: a server for this test alone, stopped at its end."""
    exe = _redis_server()
    servers: list[OwnRedis] = []

    def make(persist: bool = True) -> OwnRedis:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        server = OwnRedis(exe, workdir, persist)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    exe = _redis_server()
    proc, port = _start(exe, tmp_path_factory.mktemp("redis"))
    try:
        yield port
    finally:
        _stop(proc)


@pytest.fixture
def client(redis_port: int) -> Iterator[Any]:
    c = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=10)
    yield c
    c.close()


@pytest.fixture
def app() -> str:
    """A fresh app name: every test has its own keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_broker(client: Any, app: str) -> Callable[..., Broker]:
    """``make_broker("A", lease_ms=300)``: a broker on this test's app, as consumer ``A``, with the
    tests' key unless told otherwise (``secret=None, insecure=True``: none)."""

    def make(consumer: str | None = None, **options: Any) -> Broker:
        options.setdefault("lease_ms", 300)
        if not options.get("insecure"):
            options.setdefault("secret", SECRET)
        return Broker(client, app, consumer=consumer, **options)

    return make
