"""Hosts and clients through the Redis server's outages: a real ``redis-server`` of the test's own,
killed (SIGKILL) and restarted on the same port mid-run, with AOF and without persistence, or frozen
(SIGSTOP) for longer than the socket timeout.  Hosts are ``prefork run`` processes.

Every submitted task ends with exactly one outcome: its value (having run once: each run leaves a
line), or, when Redis lost it, ``TaskLost``; no host exits, and none hangs.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import OwnRedis
from prefork_redis import BrokerUnavailable, Client, TaskLost
from redis_support import SECRET, host_config, start_host, stop_host

from prefork.testing import wait_until

OwnRedisFactory = Callable[..., OwnRedis]
STOPPED_BY_SIGTERM = 128 + signal.SIGTERM
#: what the hosts here register: a methods map (a resolver of prefork's own)
METHODS = 'name = "methods"\nmethods = { record = "hosttasks:record", nap = "hosttasks:nap" }'


def runs(path: Path) -> list[int]:
    """The values of the tasks that ran, one per run, sorted."""
    return sorted(int(line) for line in path.read_text().split()) if path.exists() else []


def drained(url: str, app: str) -> bool:
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        tasks = f"pf:{{{app}}}:tasks"
        return r.xlen(tasks) == 0 and r.xpending(tasks, "workers")["pending"] == 0
    finally:
        r.close()


def outages(log: Path) -> int:
    """How many outages the host logged (each once, when it began)."""
    return log.read_text().count(": unavailable (")


def test_a_restart_with_aof_loses_nothing_stops_no_host_and_runs_each_task_once(
    own_redis: OwnRedisFactory, app: str, tmp_path: Path
) -> None:
    server = own_redis(persist=True)
    ran = tmp_path / "runs"
    host, log = start_host(host_config(tmp_path / "host.toml", server.url, app, resolver=METHODS))
    try:
        with Client(server.url, app, secret=SECRET) as hosts:
            futures = [hosts.submit("record", str(ran), i, 0.15) for i in range(24)]
            wait_until(lambda: sum(f.done() for f in futures) >= 4, timeout=30, what="the first results")
            server.kill()
            killed = time.monotonic()
            # down long enough for running tasks to end (their results unpublishable) and every side to notice
            wait_until(lambda: host.poll() is not None
                       or (outages(log) == 1 and hosts.outage.down and time.monotonic() - killed > 0.6),
                       timeout=20, what="the host and the client to notice the outage")  # fmt: skip
            assert host.poll() is None, log.read_text()  # the host lives through it
            assert not any(f.done() and f.exception() for f in futures)  # nobody was told a task failed
            server.restart()
            assert [f.result(timeout=30) for f in futures] == list(range(24))
        assert runs(ran) == list(range(24))  # each ran once: no completion lost, none repeated
        assert host.poll() is None, log.read_text()
        wait_until(lambda: drained(server.url, app), timeout=10, what="the stream and the pending list to empty")
        assert outages(log) == 1 and "available again after" in log.read_text()
    finally:
        code = stop_host(host)
    assert code == STOPPED_BY_SIGTERM, log.read_text()


def test_a_restart_without_persistence_ends_each_lost_task_as_lost_and_the_host_serves_on(
    own_redis: OwnRedisFactory, app: str, tmp_path: Path
) -> None:
    server = own_redis(persist=False)
    ran = tmp_path / "runs"
    host, log = start_host(host_config(tmp_path / "host.toml", server.url, app, resolver=METHODS))
    try:
        with Client(server.url, app, secret=SECRET) as hosts:
            futures = [hosts.submit("record", str(ran), i, 0.3) for i in range(10)]
            wait_until(lambda: sum(f.done() for f in futures) >= 2, timeout=30, what="the first results")
            server.kill()
            wait_until(lambda: host.poll() is not None or outages(log) == 1, timeout=20, what="the host to notice")
            assert host.poll() is None, log.read_text()  # the host lives through it
            server.restart()  # empty: every task, result and key is gone
            outcomes: list[Any] = []
            for future in futures:  # none hangs: each has a result, or is lost
                try:
                    outcomes.append(future.result(timeout=30))
                except TaskLost as exc:
                    assert "lost task" in str(exc) and "may have run" in str(exc)
                    outcomes.append("lost")
            assert "lost" in outcomes
            assert all(value in ("lost", i) for i, value in enumerate(outcomes))
            assert hosts.submit("nap", 99, 0).result(timeout=30) == 99  # the host serves on
        assert host.poll() is None, log.read_text()
        assert outages(log) == 1
    finally:
        code = stop_host(host)
    assert code == STOPPED_BY_SIGTERM, log.read_text()


def test_a_redis_frozen_longer_than_the_socket_timeout_delays_but_loses_nothing(
    own_redis: OwnRedisFactory, app: str, tmp_path: Path
) -> None:
    server = own_redis(persist=True)
    ran = tmp_path / "runs"
    config = host_config(tmp_path / "host.toml", server.url, app, resolver=METHODS, transport="socket_timeout = 1.0")
    host, log = start_host(config)
    try:
        with Client(server.url, app, secret=SECRET, socket_timeout=1.0) as hosts:
            futures = [hosts.submit("record", str(ran), i, 0.1) for i in range(20)]
            wait_until(lambda: sum(f.done() for f in futures) >= 3, timeout=30, what="the first results")
            server.freeze()
            try:  # frozen until both sides have timed out at least once, and longer than the socket timeout
                wait_until(lambda: host.poll() is not None or (outages(log) == 1 and hosts.outage.down_for > 1.5),
                           timeout=20, what="the host and the client to time out")  # fmt: skip
            finally:
                server.thaw()
            assert host.poll() is None, log.read_text()  # the host lives through it
            assert [f.result(timeout=30) for f in futures] == list(range(20))
        assert runs(ran) == list(range(20))
        assert host.poll() is None, log.read_text()
        wait_until(lambda: drained(server.url, app), timeout=10, what="the stream and the pending list to empty")
    finally:
        code = stop_host(host)
    assert code == STOPPED_BY_SIGTERM, log.read_text()


def test_a_submit_while_redis_is_down_is_sent_once_it_is_back(
    own_redis: OwnRedisFactory, app: str, tmp_path: Path
) -> None:
    server = own_redis(persist=True)
    host, log = start_host(host_config(tmp_path / "host.toml", server.url, app, resolver=METHODS))
    try:
        with Client(server.url, app, secret=SECRET) as hosts:
            assert hosts.submit("nap", 1, 0).result(timeout=30) == 1
            server.kill()
            future = hosts.submit("nap", 2, 0)  # no error: it is sent when Redis is back
            assert not future.done()
            server.restart()
            assert future.result(timeout=30) == 2
        assert host.poll() is None, log.read_text()
    finally:
        code = stop_host(host)
    assert code == STOPPED_BY_SIGTERM, log.read_text()


def test_a_broker_timeout_ends_waiting_futures_with_an_unknown_outcome(own_redis: OwnRedisFactory, app: str) -> None:
    server = own_redis(persist=False)
    with Client(server.url, app, secret=SECRET, broker_timeout=1.0) as hosts:
        waiting = hosts.submit("nap", 1, 0)  # no host serves the stream: it waits
        server.kill()
        error = waiting.exception(timeout=20)
        unsent = hosts.submit("nap", 2, 0)  # Redis is down: held, then given up too
        later = unsent.exception(timeout=20)
    for exc in (error, later):
        assert isinstance(exc, BrokerUnavailable), exc
        assert "unreachable for" in str(exc) and "outcome of task" in str(exc) and "unknown" in str(exc)


def test_without_a_broker_timeout_the_client_keeps_waiting_through_an_outage(
    own_redis: OwnRedisFactory, app: str
) -> None:
    server = own_redis(persist=True)
    with Client(server.url, app, secret=SECRET) as hosts:
        waiting = hosts.submit("nap", 1, 0)
        server.kill()
        killed = time.monotonic()
        wait_until(lambda: waiting.done() or time.monotonic() - killed > 1.0, timeout=20, what="a second of outage")
        assert not waiting.done(), waiting.exception()  # no failed read fails a future
        assert hosts.outage.down
        with pytest.raises(TimeoutError):
            waiting.result(timeout=0.1)  # bounded by the caller's timeout; still waiting
        server.restart()
        wait_until(lambda: not hosts.outage.down, timeout=20, what="the client to reconnect")
        assert not waiting.done()  # Redis kept it (AOF): it still waits for a host
        hosts.shutdown(wait=False)
