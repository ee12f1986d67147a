"""Many tasks per round trip: a client's burst of submits, a host's fetch, its completions.

Calls are counted with Redis's own ``INFO commandstats`` (``cmdstat_evalsha``:
every script call), before and after; the session's server runs one test at
a time.  No timing is asserted but one bound far from any wait: an answer is
published while the host's fetch waits in Redis, long before that wait ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prefork_redis import OK, Broker, Client, _scripts, serve
from prefork_redis.broker import SEND_BATCH
from prefork_redis.errors import GroupMissing
from redis_support import SECRET

import prefork
from prefork.testing import wait_until

MakeBroker = Callable[..., Broker]


def script_calls(client: Any) -> int:
    """Script calls so far; every script of the protocol loaded first, so that none of the
    calls counted is a NOSCRIPT answer followed by the same call again."""
    for source in (_scripts.SUBMIT, _scripts.FETCH, _scripts.COMPLETE, _scripts.ADMIT, _scripts.RELEASE):
        client.script_load(source)
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def submitted(broker: Broker, count: int, reply_to: str = "c") -> list[str]:
    ids = broker.send_many([broker.prepare(f"t{i}", i, reply_to) for i in range(count)])
    assert all(ids)
    return [i for i in ids if i]


def test_a_batch_of_submits_is_one_script_call_and_queues_each_task_id_once(
    client: Any, make_broker: MakeBroker
) -> None:
    broker = make_broker("A")
    envelopes = [broker.prepare(f"t{i}", i, "c") for i in range(50)]
    envelopes.append(broker.prepare("t7", "again", "c"))  # an id already in the batch
    before = script_calls(client)
    ids = broker.send_many(envelopes)
    assert script_calls(client) - before == 1
    assert all(ids[:50]) and ids[50] is None
    assert client.xlen(broker.keys.tasks) == 50
    assert broker.send_many(envelopes[:1]) == [None]  # and again later
    assert [t.decode() for t in broker.fetch(100, block_ms=None)] == list(range(50))


def test_more_than_a_batch_is_sent_as_several_calls(client: Any, make_broker: MakeBroker) -> None:
    broker = make_broker("A")
    before = script_calls(client)
    assert len(submitted(broker, SEND_BATCH + 1)) == SEND_BATCH + 1
    assert script_calls(client) - before == 2


def test_a_fetch_takes_released_and_new_tasks_and_admits_them_in_one_script_call(
    client: Any, make_broker: MakeBroker
) -> None:
    a, b = make_broker("A", lease_ms=60_000), make_broker("B", lease_ms=60_000)
    submitted(a, 6)
    released = a.fetch(2, block_ms=None)
    assert all(a.release(t.entry_id) for t in released)
    before = script_calls(client)
    tasks = b.fetch(5, block_ms=None)
    assert script_calls(client) - before == 1
    assert [(t.task_id, t.deliveries) for t in tasks] == [("t0", 2), ("t1", 2), ("t2", 1), ("t3", 1), ("t4", 1)]
    # admitted: each dedup key names its entry
    assert all(client.get(b.keys.dedup(t.task_id)) == t.entry_id.encode() for t in tasks)


def test_a_batch_of_completions_is_one_script_call_and_publishes_each_entry_once(
    client: Any, make_broker: MakeBroker
) -> None:
    a, b = make_broker("A", lease_ms=300), make_broker("B", lease_ms=300)
    submitted(a, 4, reply_to="c1")
    submitted(a, 0)
    tasks = a.fetch(4, block_ms=None)
    done = [(t, a.encode_result(t, t.decode() * 10), OK) for t in tasks]
    # B takes the last one after A's lease: A's completion of it must publish nothing
    (taken,) = wait_until(lambda: b.reap(1) if b.reap(0) == [] else [], what="B to reap an entry", timeout=10)
    before = script_calls(client)
    published = a.complete_many([*done, done[0]])  # the first twice: published once
    assert script_calls(client) - before == 1
    lost = [t.entry_id for t in tasks].index(taken.entry_id)
    assert published == [i != lost for i in range(4)] + [False]
    values = sorted(r.decode() for r in a.results("c1", count=10))
    assert values == sorted(t.decode() * 10 for i, t in enumerate(tasks) if i != lost)


def test_an_exchange_completes_then_fetches_and_its_wait_publishes_what_came_meanwhile(
    client: Any, make_broker: MakeBroker
) -> None:
    a = make_broker("A")
    submitted(a, 3)
    first = a.fetch(2, block_ms=None)
    last = a.fetch(1, block_ms=None)
    done = [(t, a.encode_result(t, "x"), OK) for t in first]
    published, tasks = a.exchange(done, 4, block_ms=None)
    assert published == [True, True] and tasks == []
    # nothing to take: the completions given by before_wait go out with the wait
    late = [(last[0], a.encode_result(last[0], "late"), OK)]
    published, tasks = a.exchange([], 4, block_ms=50, before_wait=lambda: late)
    assert published == [True] and tasks == []
    assert sorted(r.decode() for r in a.results("c", count=10)) == ["late", "x", "x"]
    assert client.xlen(a.keys.tasks) == 0


def test_an_exchange_whose_completions_meet_a_lost_group_raises_instead_of_dropping_them(
    client: Any, make_broker: MakeBroker
) -> None:
    """The caller must learn that what it handed over was not published (Redis lost the
    group: restarted empty), even when it handed it over just before the wait."""
    a = make_broker("A")
    submitted(a, 1)
    (task,) = a.fetch(1, block_ms=None)
    late = [(task, a.encode_result(task, "late"), OK)]

    calls: list[int] = []

    def lose_the_group() -> list[Any]:
        if not calls:
            client.delete(a.keys.tasks)  # once, as a restart without persistence would
        calls.append(1)
        return late

    with pytest.raises(GroupMissing):
        a.exchange([], 1, block_ms=50, before_wait=lose_the_group)
    assert calls == [1]  # taken once: not handed over a second time (the caller counts on one answer each)
    assert a.fetch(1, block_ms=None) == []  # the group was made again


def test_a_forged_entry_never_takes_a_missing_dedup_key(client: Any, make_broker: MakeBroker) -> None:
    """The fetch's first look at admission only reads; a task id with no dedup key is
    taken (ADMIT) only after the entry's signature was checked."""
    a = make_broker("A")
    forged = {"v": "2", "id": "victim", "reply_to": "c", "codec": "json",
              "expires": str(int((time.time() + 3600) * 1000)), "payload": "1", "signature": "00" * 32}  # fmt: skip
    client.xadd(a.keys.tasks, forged)
    assert a.fetch(1, block_ms=None) == []  # dead-lettered: bad signature
    assert client.get(a.keys.dedup("victim")) is None
    entry = a.send(a.prepare("victim", 2, "c"))  # the genuine task of that id still queues, and runs
    assert entry is not None
    (task,) = a.fetch(1, block_ms=None)
    assert (task.entry_id, task.decode()) == (entry, 2)


def test_a_burst_of_submits_reaches_redis_in_a_few_calls(client: Any, redis_port: int, app: str) -> None:
    hosts = Client(f"redis://127.0.0.1:{redis_port}/0", app, secret=SECRET)  # no host serves: nothing runs
    try:
        before = script_calls(client)
        for i in range(300):
            hosts.submit("operator:add", i, 1)
        wait_until(lambda: client.xlen(f"pf:{{{app}}}:tasks") == 300, timeout=20, what="every task queued")
        calls = script_calls(client) - before
    finally:
        hosts.shutdown(wait=False, cancel_futures=True)
    assert calls <= 30, f"{calls} script calls for 300 submits"


def test_a_lone_submit_is_queued_before_submit_returns(client: Any, redis_port: int, app: str) -> None:
    """Nothing else waits and nothing is being sent: the caller's thread sends it (no hop to
    the sending thread), so it is in Redis when ``submit`` returns."""
    hosts = Client(f"redis://127.0.0.1:{redis_port}/0", app, secret=SECRET)  # no host serves: nothing runs
    try:
        hosts.submit("operator:add", 1, 1)
        assert client.xlen(f"pf:{{{app}}}:tasks") == 1
    finally:
        hosts.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def slow_host(redis_port: int, app: str) -> Iterator[None]:
    """A host whose fetch waits in Redis up to 5 s (block_ms) when it has a free worker."""
    pool = prefork.Executor(2, overrides={
        "plugins": ["prefork_redis"], "transport.name": "redis", "transport.url": f"redis://127.0.0.1:{redis_port}/0",
        "transport.stream": app, "transport.secret": SECRET, "transport.block_ms": 5000, "transport.lease_ms": 30_000,
        "resolver.name": "allow", "resolver.allow": ["time:sleep", "operator:add"],
    })  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(pool, stop), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    pool.shutdown()


def test_an_answer_does_not_wait_for_the_hosts_fetch_to_end(slow_host: None, redis_port: int, app: str) -> None:
    """With a worker free, the fetch loop waits in Redis for new tasks (here up to 5 s); an
    answer that comes meanwhile is published at once, by the host's other thread."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    with Client(url, app, secret=SECRET) as hosts:
        assert hosts.submit("operator:add", 1, 1).result(timeout=20) == 2  # the host is up
        for _ in range(3):
            start = time.monotonic()
            assert hosts.submit("time:sleep", 0.2).result(timeout=20) is None
            assert time.monotonic() - start < 2.5, "the answer waited for the fetch's 5 s wait"
