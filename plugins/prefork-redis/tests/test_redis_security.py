"""The attacks of issue "write access to Redis is code execution on every host", each against a real
host and a real Redis, each with a payload that would create a file: the file never appears.

- a task added to the stream by anyone who can write to Redis (no key): a host refuses to start
  without a key, and with one never runs an unsigned task, whatever its codec;
- a task calling what the host did not register (``os:system``), even signed by a key holder;
- a genuine signed task copied back into the stream: never runs again (the dedup key names its
  entry; the host remembers what it ran; the signed expiry bounds it all).
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefork_redis import Client, DeadLettered, RemoteError, serve
from redis_support import SECRET, host_config, start_host, stop_host

import prefork
from prefork.testing import wait_until


@pytest.fixture
def url(redis_port: int) -> str:
    return f"redis://127.0.0.1:{redis_port}/0"


class Hosts:
    """``hosts({...overrides})``: a pool of 2 serving the test's stream in a thread; ``hosts.stop(pool)``."""

    def __init__(self, url: str, app: str) -> None:
        self.url, self.app = url, app
        self.running: dict[int, tuple[prefork.Executor, threading.Event, threading.Thread]] = {}

    def __call__(self, overrides: dict[str, Any]) -> prefork.Executor:
        base = {"plugins": ["prefork_redis"], "transport.name": "redis", "transport.url": self.url,
                "transport.stream": self.app, "transport.lease_ms": 900, "transport.block_ms": 200}  # fmt: skip
        pool = prefork.Executor(2, overrides={**base, **overrides})
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(pool, stop), daemon=True)
        thread.start()
        self.running[id(pool)] = (pool, stop, thread)
        return pool

    def stop(self, pool: prefork.Executor) -> None:
        pool, stop, thread = self.running.pop(id(pool))
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        pool.shutdown()


@pytest.fixture
def serve_pool(url: str, app: str) -> Iterator[Hosts]:
    hosts = Hosts(url, app)
    yield hosts
    for pool, *_ in list(hosts.running.values()):
        hosts.stop(pool)


def tasks_key(app: str) -> str:
    return f"pf:{{{app}}}:tasks"


def dead(client: Any, app: str) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in client.xrange(f"pf:{{{app}}}:dead")]


def reasons(client: Any, app: str) -> list[bytes]:
    return [d[b"reason"] for d in dead(client, app)]


def v2(payload: bytes, *, task_id: str, codec: str = "json") -> dict[str, Any]:
    """An unsigned protocol v2 entry, as a writer without the key would add it."""
    expires = str(int((time.time() + 600) * 1000))
    return {"v": "2", "id": task_id, "reply_to": "y", "codec": codec, "expires": expires, "payload": payload}


class Trap:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


# -- a writer without the key ------------------------------------------------------------------


def test_the_documented_keyless_host_refuses_to_start_and_an_injected_task_never_runs(
    url: str, app: str, client: Any, tmp_path: Path
) -> None:
    proof = tmp_path / "pwned"
    # the entry, as anyone who can write to Redis adds it
    payload = json.dumps({"method": "os:system", "args": [f"touch {proof}"]})
    client.xadd(tasks_key(app), {"id": "x", "reply_to": "y", "codec": "json", "payload": payload})
    config = host_config(tmp_path / "host.toml", url, app, secret=None)  # codec json, no secret: the old docs
    proc, log = start_host(config)
    try:
        wait_until(lambda: proc.poll() is not None or proof.exists(), timeout=30, what="the host to stop (or run it)")
        assert not proof.exists()
        assert proc.wait(20) == 2  # a configuration error
        message = log.read_text()
        assert f"{config}: transport.secret = '': a host needs an HMAC key" in message
        assert "insecure = true" in message
    finally:
        stop_host(proc)


def test_with_a_key_no_unsigned_or_forged_task_runs_whatever_its_codec(
    serve_pool: Hosts, url: str, app: str, client: Any, tmp_path: Path
) -> None:
    # the host accepts every codec (cloudpickle: its key holders may send code) and allows touch:
    # only the signature stands between these entries and the files
    serve_pool({"transport.secret": SECRET, "transport.codec": "cloudpickle",
                "resolver.name": "allow", "resolver.allow": ["hosttasks:touch"]})  # fmt: skip
    files = [tmp_path / f"pwned-{i}" for i in range(5)]
    call = {"method": "hosttasks:touch", "args": [str(files[0])]}
    try:
        import msgpack  # type: ignore[import-untyped,unused-ignore]

        packed: bytes = msgpack.packb({"method": "hosttasks:touch", "args": [str(files[1])]})
    except ImportError:  # never decoded anyway: the signature is checked first
        packed = b"\x82\xa6method"
    key = tasks_key(app)
    client.xadd(key, v2(json.dumps(call).encode(), task_id="json"))
    client.xadd(key, v2(packed, task_id="msgpack", codec="msgpack"))
    client.xadd(key, v2(pickle.dumps(Trap(files[2])), task_id="pickle", codec="pickle"))
    forged = v2(json.dumps({**call, "args": [str(files[3])]}).encode(), task_id="forged")
    client.xadd(key, {**forged, "signature": b"0" * 64})
    client.xadd(
        key, {"id": "v1", "reply_to": "y", "codec": "json", "payload": json.dumps({**call, "args": [str(files[4])]})}
    )
    wait_until(lambda: len(dead(client, app)) == 5, timeout=20, what="five dead letters")
    assert sorted(reasons(client, app)) == [b"bad signature"] * 4 + [b"unsupported protocol"]
    with Client(url, app, secret=SECRET) as hosts:  # the host is serving: a signed task runs
        control = tmp_path / "signed"
        assert hosts.submit("hosttasks:touch", str(control)).result(timeout=20) == str(control)
    assert control.exists()
    assert not any(f.exists() for f in files)


def test_an_insecure_host_says_so_and_still_runs_only_what_it_allows(
    serve_pool: Hosts, url: str, app: str, client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proof = tmp_path / "pwned"
    with caplog.at_level(logging.WARNING, logger="prefork.redis"):
        serve_pool({"transport.insecure": True, "resolver.name": "allow", "resolver.allow": ["operator:*"]})
        wait_until(lambda: "INSECURE" in caplog.text, what="the warning")
    assert "anyone who can write to the Redis server" in caplog.text
    with Client(url, app, insecure=True) as anyone:
        assert anyone.submit("operator:mul", 6, 7).result(timeout=20) == 42  # unsigned, and allowed
        with pytest.raises(RemoteError) as info:
            anyone.submit("os:system", f"touch {proof}").result(timeout=20)
    assert info.value.type_name == "MethodNotAllowed"
    assert not proof.exists()


# -- a key holder calling what the host did not register ----------------------------------------

REGISTERED = {
    # the pool's default resolver ("chain") with a methods map: its imports are never used remotely
    "chain-methods": ({"resolver.name": "chain", "resolver.methods": {"mul": "operator:mul"}}, "mul"),
    "allow-patterns": ({"resolver.name": "allow", "resolver.allow": ["operator:*"]}, "operator:mul"),
}


@pytest.mark.parametrize("registered", list(REGISTERED))
def test_a_key_holder_cannot_call_what_the_host_did_not_register(
    registered: str, serve_pool: Hosts, url: str, app: str, tmp_path: Path
) -> None:
    resolver, allowed = REGISTERED[registered]
    serve_pool({"transport.secret": SECRET, **resolver})
    proof = tmp_path / "pwned"
    with Client(url, app, secret=SECRET) as hosts:
        attacks = [
            hosts.submit("os:system", f"touch {proof}"),
            hosts.submit("posix:system", f"touch {proof}"),
            hosts.submit("subprocess:call", ["touch", str(proof)]),
            hosts.submit("builtins:exec", f"open({str(proof)!r}, 'w')"),
            hosts.submit("hosttasks:touch", str(proof)),  # importable, but not registered
            hosts.submit("operator.os:system", f"touch {proof}"),
        ]
        for future in attacks:
            with pytest.raises(RemoteError) as info:
                future.result(timeout=20)
            assert info.value.type_name == "MethodNotAllowed", info.value
        assert hosts.submit(allowed, 6, 7).result(timeout=20) == 42
    assert not proof.exists()


def test_a_host_that_registers_no_method_refuses_to_start(url: str, app: str, tmp_path: Path) -> None:
    config = host_config(tmp_path / "host.toml", url, app)  # a key, but no [resolver]: "chain", which only imports
    proc, log = start_host(config)
    try:
        assert proc.wait(30) == 2
        message = log.read_text()
        assert "resolver.name = 'chain': registers no method a remote task may call" in message
        assert "allow_any_import" in message
    finally:
        stop_host(proc)


# -- a genuine signed task, copied back --------------------------------------------------------


def test_a_signed_task_copied_back_into_the_stream_never_runs_again(
    serve_pool: Hosts, url: str, app: str, client: Any, tmp_path: Path
) -> None:
    proof = tmp_path / "ran"
    with Client(url, app, secret=SECRET) as hosts:
        future = hosts.submit("touch", str(proof))
        ((_entry, fields),) = client.xrange(tasks_key(app))  # what a listener on Redis saw go by
        serve_pool(
            {"transport.secret": SECRET, "resolver.name": "methods", "resolver.methods": {"touch": "hosttasks:touch"}}
        )
        assert future.result(timeout=20) == str(proof)
    proof.unlink()
    client.xadd(tasks_key(app), fields)  # byte for byte
    wait_until(lambda: len(dead(client, app)) == 1 or proof.exists(), timeout=20, what="the copy to be dead-lettered")
    assert not proof.exists()
    assert reasons(client, app) == [b"replay"]
    # one who can also delete keys removes the record of the entry: the host remembers what it ran
    client.delete(f"pf:{{{app}}}:dedup:{future.task_id}")
    client.xadd(tasks_key(app), fields)
    wait_until(lambda: len(dead(client, app)) == 2 or proof.exists(), timeout=20, what="the second copy dead-lettered")
    assert not proof.exists()
    assert reasons(client, app) == [b"replay", b"replay"]


def test_a_task_past_its_signed_expiry_never_runs_even_on_a_host_that_never_saw_it(
    serve_pool: Hosts, url: str, app: str, client: Any, tmp_path: Path
) -> None:
    late, copied = tmp_path / "late", tmp_path / "copied"
    allow = {"transport.secret": SECRET, "resolver.name": "allow", "resolver.allow": ["hosttasks:touch"]}
    with Client(url, app, secret=SECRET, task_ttl_s=1) as hosts:
        # submitted while no host runs, and still queued when it expires: its client is told
        stale = hosts.submit("hosttasks:touch", str(late))
        ((_entry, old_fields),) = client.xrange(tasks_key(app))
        expires = int(old_fields[b"expires"]) / 1000
        wait_until(lambda: time.time() > expires + 0.1, timeout=10, what="the expiry")
        first = serve_pool(allow)
        with pytest.raises(DeadLettered, match="expired"):
            stale.result(timeout=20)
        # one that ran, copied back after its expiry, its dedup record deleted, to a host that never saw it
        ran = hosts.submit("hosttasks:touch", str(copied))
        ((_entry, fields),) = client.xrange(tasks_key(app))
        assert ran.result(timeout=20) == str(copied)
    copied.unlink()
    expires = int(fields[b"expires"]) / 1000
    wait_until(lambda: time.time() > expires + 0.1, timeout=10, what="the expiry")
    client.delete(f"pf:{{{app}}}:dedup:{ran.task_id}")
    serve_pool.stop(first)
    serve_pool(allow)  # a second host: no memory of the task
    client.xadd(tasks_key(app), fields)
    wait_until(lambda: len(dead(client, app)) == 2 or copied.exists(), timeout=20, what="the copy dead-lettered")
    assert reasons(client, app) == [b"expired", b"expired"]
    assert not late.exists() and not copied.exists()
