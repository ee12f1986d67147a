"""A real ``redis-server`` for the session, and a fresh app (fresh keys) per test.

The server listens on a free loopback port, keeps nothing on disk and is
stopped by pid at the end (SIGTERM, then SIGKILL, then waitpid).  Without
``redis-server`` the broker tests are skipped, or fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install ./plugins/prefork-redis)")
pytest.importorskip("prefork_redis", reason="prefork-redis is not installed (pip install ./plugins/prefork-redis)")

from prefork_redis.broker import Broker  # noqa: E402

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


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


def _start(exe: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server and wait (bounded) until it answers PING; retry on a port lost to a race."""
    last = ""
    for _attempt in range(3):
        port = _free_port()
        log = workdir / f"redis-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(workdir)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.ping():
                        return proc, port
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        _stop(proc)
        last = log.read_text(errors="replace")[-2000:]
    pytest.fail(f"redis-server did not answer PING within {START_TIMEOUT} s; its log:\n{last}")


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None:
        why = "redis-server is not installed (apt-get install redis-server): the broker tests need a real server"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
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
    """``make_broker("A", lease_ms=300)``: a broker on this test's app, as consumer ``A``."""

    def make(consumer: str | None = None, **options: Any) -> Broker:
        options.setdefault("lease_ms", 300)
        return Broker(client, app, consumer=consumer, **options)

    return make
