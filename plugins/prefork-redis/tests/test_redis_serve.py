"""A prefork pool serving a Redis stream, and a client submitting to it: real processes, real Redis."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import redis
from prefork_redis import Client, DeadLettered, DispatcherClient, RemoteError, serve
from prefork_redis.errors import BrokerError
from redis_support import SECRET, host_env

import prefork
from prefork.testing import wait_until

ROOT = Path(__file__).resolve().parents[3]
#: what the tests' hosts let remote tasks call
ALLOW = ["operator:*", "math:*", "posixpath:join", "time:sleep", "hosttasks:*", f"{__name__}:whoami"]


@pytest.fixture
def url(redis_port: int) -> str:
    return f"redis://127.0.0.1:{redis_port}/0"


def _pool(url: str, app: str, **transport: Any) -> prefork.Executor:
    overrides = {"plugins": ["prefork_redis"], "transport.name": "redis", "transport.url": url,
                 "transport.stream": app, "transport.lease_ms": 900, "transport.block_ms": 200,
                 "transport.secret": SECRET, "resolver.name": "allow", "resolver.allow": ALLOW}  # fmt: skip
    overrides.update({f"transport.{k}": v for k, v in transport.items()})
    return prefork.Executor(2, overrides=overrides)


@pytest.fixture
def host(url: str, app: str) -> Iterator[Callable[..., prefork.Executor]]:
    """``host(**transport options)``: a pool serving the test's stream in a thread, stopped after the test."""
    running: list[tuple[prefork.Executor, threading.Event, threading.Thread]] = []

    def start(**transport: Any) -> prefork.Executor:
        pool = _pool(url, app, **transport)
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(pool, stop), daemon=True)
        thread.start()
        running.append((pool, stop, thread))
        return pool

    yield start
    for pool, stop, thread in running:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        pool.shutdown()


def _empty(client: Any, app: str) -> bool:
    tasks = f"pf:{{{app}}}:tasks"
    return client.xlen(tasks) == 0 and client.xpending(tasks, "workers")["pending"] == 0


def test_tasks_from_a_client_run_in_the_pool_and_each_answer_comes_back_once(
    host: Any, url: str, app: str, client: Any
) -> None:
    host()
    with Client(url, app, secret=SECRET) as hosts:
        futures = [hosts.submit("operator:mul", i, 3) for i in range(40)]
        assert [f.result(timeout=20) for f in futures] == [i * 3 for i in range(40)]
        assert list(hosts.map("operator:add", [1, 2], [10, 20])) == [11, 22]
        assert hosts.submit(os.path.join, "a", "b").result(timeout=20) == "a/b"  # a function goes by name
    wait_until(lambda: _empty(client, app), what="the stream and the pending list to empty")


def test_an_exception_on_a_host_reaches_the_client_with_its_type_and_traceback(host: Any, url: str, app: str) -> None:
    host()
    with Client(url, app, secret=SECRET) as hosts, pytest.raises(RemoteError) as info:
        hosts.submit("math:sqrt", -1).result(timeout=20)
    assert info.value.type_name == "ValueError"
    assert "math domain error" in info.value.message and "Traceback" in info.value.remote_traceback


def test_a_malformed_task_is_answered_with_an_error_saying_what_was_wrong(host: Any, url: str, app: str) -> None:
    host()
    with Client(url, app, secret=SECRET) as hosts:
        hosts._futures["raw-1"] = future = Future()  # waits for the answer to a task sent by hand
        hosts.broker.submit("raw-1", 42, hosts.client_id)  # not {"method": ..., ...}
        with pytest.raises(RemoteError, match=re.escape('a task is {"method"')):
            future.result(timeout=20)


def test_a_task_that_kills_its_worker_is_retried_then_dead_lettered(
    host: Any, url: str, app: str, client: Any
) -> None:
    pool = host(max_deliveries=2)
    with Client(url, app, secret=SECRET) as hosts:
        doomed = hosts.submit("hosttasks:die")
        fine = hosts.submit("operator:add", 1, 1)
        assert fine.result(timeout=20) == 2
        with pytest.raises(DeadLettered):
            doomed.result(timeout=30)
    assert client.xlen(f"pf:{{{app}}}:dead") == 1
    wait_until(lambda: _empty(client, app), what="the stream and the pending list to empty")
    wait_until(lambda: pool.stats()["idle"] == 2, what="the pool healed")


def test_a_second_host_takes_the_tasks_of_a_host_that_stopped_renewing(
    host: Any, url: str, app: str, client: Any, tmp_path: Path
) -> None:
    # host A fetches a task, then is frozen (SIGSTOP on the whole process, as a hung
    # machine): after the lease host B runs it; A's late result is fenced off.
    script = tmp_path / "host_a.py"
    script.write_text(
        "import sys, threading\n"
        "import prefork\n"
        "from prefork_redis import serve\n"
        "pool = prefork.Executor(1, overrides={'plugins': ['prefork_redis'], 'transport.name': 'redis',\n"
        f"    'transport.url': {url!r}, 'transport.stream': {app!r}, 'transport.lease_ms': 600,\n"
        f"    'transport.block_ms': 100, 'transport.secret': {SECRET!r}, 'resolver.name': 'allow',\n"
        "    'resolver.allow': ['time:sleep', 'operator:add']})\n"
        "print('up', flush=True)\n"
        "serve(pool)\n"
    )
    log = tmp_path / "host_a.log"
    with log.open("w") as err:
        a = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    try:
        assert a.stdout is not None and a.stdout.readline().strip() == "up"
        with Client(url, app, secret=SECRET) as hosts:
            slow = hosts.submit("time:sleep", 1.5)
            holder = wait_until(lambda: _holder(client, app), timeout=10, what="host A to take the task")
            assert f":{a.pid}:" in holder  # host:pid:nonce
            os.kill(a.pid, signal.SIGSTOP)
            host(lease_ms=600)  # host B
            assert slow.result(timeout=20) is None  # run by B after A's lease ran out
            assert slow.task_id  # the id every host sees
            os.kill(a.pid, signal.SIGCONT)
            # thawed, A learns it lost the lease (by renewing, or by its fenced completion)
            wait_until(lambda: "lease was lost" in log.read_text() or "lost the lease" in log.read_text(),
                       timeout=10, what="host A to notice its lost lease")  # fmt: skip
            again = hosts.submit("operator:add", 2, 2)
            assert again.result(timeout=20) == 4
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.terminate()
        a.wait(20)
        if a.stdout is not None:
            a.stdout.close()
    wait_until(lambda: _empty(client, app), what="the stream and the pending list to empty")


def _holder(client: Any, app: str) -> str:
    try:
        pending = client.xpending_range(f"pf:{{{app}}}:tasks", "workers", "-", "+", 10)
    except redis.ResponseError:  # no group yet: host A is still starting
        return ""
    return pending[0]["consumer"].decode() if pending else ""


def test_serve_needs_the_redis_transport() -> None:
    with prefork.Executor(1) as pool, pytest.raises(BrokerError, match='needs \\[transport\\] name = "redis"'):
        serve(pool)


def test_a_function_of_main_cannot_travel_by_name(url: str, app: str) -> None:
    with Client(url, app, secret=SECRET) as hosts, pytest.raises(TypeError, match="cannot travel by name"):
        hosts.submit(lambda x: x, 1)


def _host_config(tmp_path: Path, name: str, url: str, app: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\n'
        'app = "prefork_redis:serve"\n'
        'plugins = ["prefork_redis"]\n'
        "[scaling]\nname = \"fixed\"\nworkers = 2\n"
        f'[transport]\nname = "redis"\nurl = "{url}"\nstream = "{app}"\nlease_ms = 800\nblock_ms = 200\n'
        f'max_deliveries = 2\nsecret = "{SECRET}"\n'
        '[resolver]\nname = "allow"\nallow = ["time:sleep", "operator:mul", "hosttasks:die"]\n'
    )
    return path


def test_two_hosts_by_prefork_run_one_killed_mid_task_every_task_answered_once(
    url: str, app: str, client: Any, tmp_path: Path, prefork_no_leaks: None
) -> None:
    hosts_ = {
        name: subprocess.Popen(
            [sys.executable, "-m", "prefork", "run", "--config", str(_host_config(tmp_path, name, url, app))],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=host_env(),
        )
        for name in ("host-a", "host-b")
    }  # fmt: skip
    try:
        with Client(url, app, secret=SECRET) as hosts:
            slow = [hosts.submit("time:sleep", 0.4) for _ in range(8)]
            quick = [hosts.submit("operator:mul", i, i) for i in range(40)]
            doomed = hosts.submit("hosttasks:die")  # kills every worker that runs it
            # wait until host A holds a task, then kill it as the OOM killer would
            a = hosts_["host-a"]
            wait_until(lambda: any(f":{a.pid}:" in c for c in _holders(client, app)), timeout=10, what="host A busy")
            a.kill()
            killed = time.monotonic()
            assert [f.result(timeout=30) for f in slow] == [None] * 8  # A's were taken by B after the lease
            # the lease (0.8 s), B's next reap (lease / 3) and B's two workers running what was left
            assert time.monotonic() - killed < 0.8 + 0.3 + 8 * 0.4 / 2 + 3.0
            assert [f.result(timeout=30) for f in quick] == [i * i for i in range(40)]
            with pytest.raises(DeadLettered):
                doomed.result(timeout=30)
        wait_until(lambda: _empty(client, app), timeout=10, what="the stream and the pending list to empty")
        b = hosts_["host-b"]
        b.send_signal(signal.SIGTERM)  # `prefork run` stops cleanly: 128 + SIGTERM
        assert b.wait(20) == 128 + signal.SIGTERM, b.stderr.read() if b.stderr else ""
    finally:
        for proc in hosts_.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(20)
            if proc.stderr:
                proc.stderr.close()


def _holders(client: Any, app: str) -> list[str]:
    try:
        pending = client.xpending_range(f"pf:{{{app}}}:tasks", "workers", "-", "+", 100)
    except redis.ResponseError:
        return []
    return [p["consumer"].decode() for p in pending]


def add_from(sender: Any, a: int, b: int) -> list[Any]:
    """A dispatcher-profile method: called as method(from, *params)."""
    return [sender, a + b]


def test_dispatcher_requests_through_redis_get_the_dispatcher_callbacks(url: str, app: str) -> None:
    overrides = {"plugins": ["prefork_redis"], "transport.name": "redis", "transport.url": url,
                 "transport.stream": app, "transport.block_ms": 200, "resolver.name": "methods",
                 "resolver.methods": {"add": f"{__name__}:add_from"}, "transport.secret": SECRET}  # fmt: skip
    stop = threading.Event()
    with prefork.Executor(2, overrides=overrides) as pool:
        server = threading.Thread(target=serve, args=(pool, stop), daemon=True)
        server.start()
        try:
            got: list[tuple[dict[str, Any], Any]] = []
            callback = lambda req, resp: got.append((req, resp))  # noqa: E731
            with DispatcherClient(url, app, upon_result=callback, secret=SECRET) as dispatcher:
                dispatcher.new_request({"method_name": "add", "params": [1, 2], "from": "me"})
                dispatcher.new_request({"method_name": "nope", "params": []})
                with pytest.raises(ValueError, match="needs a 'method'"):
                    dispatcher.new_request({"params": [1]})  # checked as Dispatcher.new_request checks it
                wait_until(lambda: len(got) == 2, timeout=20, what="both responses")
            by_method = {req["method_name"]: (req, resp) for req, resp in got}
            req, resp = by_method["add"]
            assert resp == ["me", 3] and req["elapsed"] > 0
            assert "error" in by_method["nope"][1] and "nope" in by_method["nope"][1]["error"]
        finally:
            stop.set()
            server.join(10)


def whoami() -> str | None:
    import prefork_redis

    return prefork_redis.task_id()


def test_user_code_on_a_host_reads_its_task_id(host: Any, url: str, app: str) -> None:
    host()
    with Client(url, app, secret=SECRET) as hosts:
        futures = [hosts.submit(f"{__name__}:whoami") for _ in range(5)]
        assert [f.result(timeout=20) for f in futures] == [f.task_id for f in futures]
    from prefork_redis import task_id

    assert task_id() is None  # outside a task


def test_a_result_goes_from_the_worker_to_redis_in_the_tasks_codec(
    host: Any, url: str, app: str, tmp_path: Path
) -> None:
    """The worker encodes the result with the task's codec (json), and the supervisor passes
    those bytes on: it never unpickles the result object (nor re-encodes it)."""
    host()
    proof = tmp_path / "unpickled"
    with Client(url, app, secret=SECRET) as hosts:
        assert hosts.submit("hosttasks:tattle", str(proof)).result(timeout=20) == {"ok": 1}
    assert not proof.exists(), f"unpickled by pid {proof.read_text().split()}"


def test_signed_pickles_between_client_and_host_with_the_secret_in_the_config(url: str, app: str) -> None:
    secret = "a secret of at least sixteen bytes"  # a host of object codecs needs no names: work comes as functions
    overrides = {"plugins": ["prefork_redis"], "transport.name": "redis", "transport.url": url,
                 "transport.stream": app, "transport.block_ms": 200, "transport.codec": "cloudpickle",
                 "transport.secret": secret}  # fmt: skip
    stop = threading.Event()
    with prefork.Executor(1, overrides=overrides) as pool:
        server = threading.Thread(target=serve, args=(pool, stop), daemon=True)
        server.start()
        try:
            with Client(url, app, codec="cloudpickle", secret=secret) as hosts:
                offset = 7
                assert hosts.submit(lambda x: x + offset, 1).result(timeout=20) == 8  # a closure travels
        finally:
            stop.set()
            server.join(10)


def test_a_host_lives_through_its_keys_being_tampered_with(
    host: Any, url: str, app: str, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = f"pf:{{{app}}}:tasks"
    with caplog.at_level(logging.WARNING, logger="prefork.redis"):
        host()
        with Client(url, app, secret=SECRET) as hosts:
            assert hosts.submit("operator:add", 1, 1).result(timeout=20) == 2
            client.delete(tasks)
            client.set(tasks, "not a stream")  # every call of the host now fails with WRONGTYPE
            wait_until(lambda: "unavailable (ResponseError: WRONGTYPE" in caplog.text, what="the host to notice")
            client.delete(tasks)  # the host makes its group again and serves on
            assert hosts.submit("operator:add", 2, 2).result(timeout=20) == 4
    assert caplog.text.count(": unavailable (") == 1
