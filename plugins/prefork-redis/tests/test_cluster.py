"""prefork-redis on a real Redis Cluster: three primaries, each with a replica, on loopback.

The fixture starts six ``redis-server --cluster-enabled yes`` in a temporary
folder (each on a free port, its cluster bus on another: ``--cluster-port``,
Redis >= 7.0), joins them with ``redis-cli --cluster create ... --cluster-replicas
1 --cluster-yes``, waits (bounded) until every node says ``cluster_state:ok``, and
stops them by pid at the end.  A node times out after 1 s
(``--cluster-node-timeout 1000``), so a replica takes over a killed primary
within a few seconds; the fixture waits for every replica to be in sync
(a replica that never synced cannot take over).  Hosts are ``prefork run`` processes with ``cluster = true``.

What is shown here, and promised in docs/scale-out.md ("Redis Cluster"):

- every key of an app hashes to one slot, so each Lua script runs on one node,
  and tasks flow through a cluster as through one server;
- when the primary of the app's slot is killed, its replica takes over: no host
  exits, a submit made meanwhile is sent once the new primary answers, and every
  task submitted before the kill still ends, with its value or with
  ``TaskLost`` (what the replica had not received is gone: a task may run again,
  or be lost), none hangs; tasks submitted after it are answered.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prefork_redis import Client, TaskLost
from redis.cluster import ClusterNode, RedisCluster
from redis_support import SECRET, host_config, start_host, stop_host

from prefork.testing import wait_until

STOPPED_BY_SIGTERM = 128 + signal.SIGTERM
NODES = 6
METHODS = 'name = "methods"\nmethods = { record = "hosttasks:record", nap = "hosttasks:nap" }'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        why = f"{name} is not installed (apt-get install redis-server; redis-cli comes with it): the cluster tests need it"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return exe


class Cluster:
    """Six nodes (three primaries with a replica each) of one test."""

    def __init__(self, workdir: Path) -> None:
        server, cli = _tool("redis-server"), _tool("redis-cli")
        version = subprocess.run([server, "--version"], capture_output=True, text=True, check=True).stdout
        major = int(re.search(r"v=(\d+)", version).group(1))  # type: ignore[union-attr]
        if major < 7:
            pytest.skip(f"the cluster fixture gives each node its bus port (--cluster-port), Redis >= 7.0: {version}")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for i in range(NODES):
            port, bus, home = _free_port(), _free_port(), workdir / f"node{i}"
            home.mkdir(parents=True)
            with (home / "log").open("wb") as log:
                self.procs[port] = subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                     "1000", "--repl-diskless-sync-delay", "0", "--save", "", "--appendonly", "no", "--dir", str(home)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )  # fmt: skip
        try:
            for port in self.procs:
                wait_until(lambda port=port: self._answers(port), timeout=10, what=f"node {port} to answer PING")
            create = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.procs), "--cluster-replicas", "1",
                 "--cluster-yes"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert create.returncode == 0, create.stdout + create.stderr
            wait_until(self._ok, timeout=30, what="every node to say cluster_state:ok, every replica in sync")
        except BaseException:
            self.stop()
            raise
        self.url = f"redis://127.0.0.1:{next(iter(self.procs))}/0"

    @staticmethod
    def _answers(port: int) -> bool:
        r = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(r.ping())
        except redis.ConnectionError:
            return False
        finally:
            r.close()

    def _ok(self) -> bool:
        for port, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            r = redis.Redis(port=port, socket_timeout=1)
            try:
                info = r.cluster("info")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != NODES:
                    return False
                replication = r.info("replication")  # a replica that never synced cannot take over
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            finally:
                r.close()
        return True

    def client(self) -> RedisCluster:
        """A client of the test's own, knowing every live node (any of them may have been killed)."""
        live = [ClusterNode("127.0.0.1", port) for port, proc in self.procs.items() if proc.poll() is None]
        return RedisCluster(startup_nodes=live, socket_timeout=5)

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        c = self.client()
        try:
            node = c.get_node_from_key(key)
            return int(node.port)
        finally:
            c.close()

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path / "cluster")
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def app() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


def _cluster_host(cluster: Cluster, app: str, path: Path, lease_ms: int = 900) -> tuple[Any, Path]:
    config = host_config(
        path, cluster.url, app, resolver=METHODS, transport=f"cluster = true\nlease_ms = {lease_ms}"
    )  # fmt: skip
    text = config.read_text().replace("lease_ms = 900\n", "", 1)  # the line host_config writes, replaced above
    config.write_text(text)
    return start_host(config)


def test_tasks_flow_through_a_three_primary_cluster_on_one_slot(cluster: Cluster, app: str, tmp_path: Path) -> None:
    ran = tmp_path / "runs"
    hosts = [_cluster_host(cluster, app, tmp_path / f"host{i}.toml") for i in range(2)]
    try:
        client = Client(cluster.url, app, secret=SECRET, cluster=True)
        try:
            futures = [client.submit("record", str(ran), i, 0.0) for i in range(60)]
            assert [f.result(timeout=60) for f in futures] == list(range(60))
        finally:
            client.shutdown(wait=False, cancel_futures=True)  # a failure above must not wait forever
        assert sorted(int(line) for line in ran.read_text().split()) == list(range(60))  # each ran once
        c = cluster.client()
        try:
            node = c.get_node_from_key(f"pf:{{{app}}}:tasks")
            keys = c.keys(f"pf:{{{app}}}:*", target_nodes=node)
            assert keys, "the app's keys are on the node of its slot"
            assert {c.keyslot(k) for k in keys} == {c.keyslot(f"pf:{{{app}}}:tasks")}  # one slot
            assert not any(c.keys(f"pf:{{{app}}}:*", target_nodes=n) for n in c.get_primaries() if n is not node)
            assert c.xlen(f"pf:{{{app}}}:tasks") == 0 and c.xpending(f"pf:{{{app}}}:tasks", "workers")["pending"] == 0
        finally:
            c.close()
    finally:
        codes = [stop_host(proc) for proc, _log in hosts]
    assert codes == [STOPPED_BY_SIGTERM] * 2, [log.read_text() for _proc, log in hosts]


def test_a_failover_of_the_apps_primary_stops_no_host_and_every_task_ends(
    cluster: Cluster, app: str, tmp_path: Path
) -> None:
    ran = tmp_path / "runs"
    host, log = _cluster_host(cluster, app, tmp_path / "host.toml", lease_ms=1500)
    try:
        client = Client(cluster.url, app, secret=SECRET, cluster=True)
        try:
            assert client.submit("nap", -1, 0).result(timeout=60) == -1  # the host is up
            before = [client.submit("record", str(ran), i, 0.2) for i in range(10)]
            wait_until(lambda: ran.exists(), timeout=20, what="the first task to start")
            primary = cluster.primary_of(f"pf:{{{app}}}:tasks")
            cluster.kill(primary)  # SIGKILL: its replica takes the slot over
            during = client.submit("nap", 100, 0)  # sent once a primary answers
            outcomes: list[Any] = []
            for future in before:  # none hangs: each has its value, or Redis lost it
                try:
                    outcomes.append(future.result(timeout=60))
                except TaskLost:
                    outcomes.append("lost")
            assert all(value in ("lost", i) for i, value in enumerate(outcomes)), outcomes
            assert during.result(timeout=60) == 100
            assert client.submit("nap", 101, 0).result(timeout=60) == 101  # served on, by the new primary
            assert cluster.primary_of(f"pf:{{{app}}}:tasks") != primary
        finally:
            client.shutdown(wait=False, cancel_futures=True)  # a failure above must not wait forever
        ran_values = {int(line) for line in ran.read_text().split()}
        assert all(i in ran_values for i, value in enumerate(outcomes) if value != "lost")  # answered: it ran
        assert host.poll() is None, log.read_text()  # the host lived through it
        assert ": unavailable (" in log.read_text()  # as an outage, logged
    finally:
        code = stop_host(host)
    assert code == STOPPED_BY_SIGTERM, log.read_text()
