"""The protocol against a real Redis: leases, ownership, dead letters, signatures.

Leases are 300 ms here.  Nothing sleeps to synchronise: a test that waits for
a lease to run out polls ``reap`` until it claims, with a deadline.  Brokers
have the tests' key unless a test says ``insecure=True``.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prefork_redis import DEAD, ERROR, OK, REJECTED, BadSignature, Broker, BrokerError, ServerTooOld, Task
from prefork_redis.broker import check_server_version
from redis_support import SECRET

from prefork.testing import wait_until as wait_for

T = TypeVar("T")
MakeBroker = Callable[..., Broker]
#: the fields of a protocol v2 task entry but the payload, id and signature
V2 = {"v": "2", "reply_to": "victim", "codec": "json", "expires": str(int((time.time() + 3600) * 1000))}


def assert_drained(client: Any, broker: Broker) -> None:
    """The task stream is empty and nothing is pending."""
    assert client.xlen(broker.keys.tasks) == 0
    assert client.xpending(broker.keys.tasks, broker.group)["pending"] == 0


def read_all(broker: Broker, client_id: str) -> list[Any]:
    return broker.results(client_id, block_ms=None)


def dead_letters(client: Any, broker: Broker) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in client.xrange(broker.keys.dead)]


class Trap:
    """Unpickling this creates ``path``: proof that a message was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


# -- the round trip -------------------------------------------------------------------


def test_submit_fetch_complete_round_trip(client: Any, make_broker: MakeBroker) -> None:
    alice, worker = make_broker("alice-client"), make_broker("A")
    entry_id = alice.submit("t1", {"x": [1, 2, 3]}, reply_to="alice")
    assert entry_id is not None
    (task,) = worker.fetch(5, block_ms=1000)
    assert (task.entry_id, task.task_id, task.reply_to, task.codec, task.deliveries) == (
        entry_id,
        "t1",
        "alice",
        "json",
        1,
    )
    assert task.decode() == {"x": [1, 2, 3]}
    assert task.submitted_at is not None and abs(task.submitted_at - time.time()) < 60
    assert worker.complete(task, {"sum": 6}) is True
    assert_drained(client, worker)
    (result,) = alice.results("alice", block_ms=1000)
    assert (result.task_id, result.status, result.decode()) == ("t1", OK, {"sum": 6})
    assert read_all(alice, "alice") == []  # once, and deleted after reading
    assert client.xlen(alice.keys.results("alice")) == 0
    assert read_all(alice, "bob") == []  # only at the right client
    assert 0 < client.ttl(alice.keys.results("alice")) <= alice.result_ttl_s


def test_error_results_and_a_second_completion(client: Any, make_broker: MakeBroker) -> None:
    worker = make_broker("A")
    worker.submit("t1", None, reply_to="c")
    (task,) = worker.fetch(1)
    assert worker.complete(task, {"type": "ValueError", "message": "no"}, status=ERROR)
    assert worker.complete(task, "again") is False  # acked and deleted: published once
    (result,) = read_all(worker, "c")
    assert (result.status, result.decode()) == (ERROR, {"type": "ValueError", "message": "no"})
    with pytest.raises(BrokerError, match="'ok' or 'error'"):
        worker.complete(task, 1, status="dead")


def test_results_without_delete_page_by_last_id(make_broker: MakeBroker) -> None:
    worker = make_broker("A")
    for i in range(3):
        worker.submit(f"t{i}", i, reply_to="c")
    for task in worker.fetch(3):
        assert worker.complete(task, task.decode() * 10)
    first = worker.results("c", count=2, delete=False)
    rest = worker.results("c", last_id=first[-1].entry_id, delete=False)
    assert [r.decode() for r in first + rest] == [0, 10, 20]
    assert len(read_all(worker, "c")) == 3  # still there until deleted


def test_dedup_queues_a_task_id_once(client: Any, make_broker: MakeBroker) -> None:
    broker = make_broker("A")
    first = broker.submit("same", 1, reply_to="c")
    assert first is not None
    assert broker.submit("same", 2, reply_to="c") is None
    assert client.xlen(broker.keys.tasks) == 1
    assert client.get(broker.keys.dedup("same")) == first.encode()
    assert 0 < client.ttl(broker.keys.dedup("same")) <= broker.dedup_ttl_s
    (task,) = broker.fetch(5)
    assert task.decode() == 1


def test_fetch_never_returns_more_than_count(make_broker: MakeBroker) -> None:
    a, b = make_broker("A"), make_broker("B")
    for i in range(7):
        a.submit(f"t{i}", i, reply_to="c")
    assert [len(a.fetch(3, block_ms=None)) for _ in range(4)] == [3, 3, 1, 0]
    # released entries count too: 3 released and 1 new, taken 2 + 1 + 1
    for i in range(7, 10):
        b.submit(f"t{i}", i, reply_to="c")
    released = b.fetch(3)
    assert len(released) == 3 and all(b.release(t.entry_id) for t in released)
    b.submit("t10", 10, reply_to="c")
    first, second, third = a.fetch(2), a.fetch(1), a.fetch(5)
    assert [len(first), len(second), len(third)] == [2, 1, 1]
    assert {t.task_id for t in first + second} == {"t7", "t8", "t9"} and third[0].task_id == "t10"
    with pytest.raises(BrokerError, match="count must be a positive integer"):
        a.fetch(0)


# -- leases ---------------------------------------------------------------------------


def test_a_dead_consumers_task_is_reaped_and_its_late_result_dropped(client: Any, make_broker: MakeBroker) -> None:
    a, b = make_broker("A"), make_broker("B")
    a.submit("t1", 21, reply_to="c")
    fetched = time.monotonic()  # before the delivery: the lease runs from a later instant
    (task_a,) = a.fetch(1)
    assert b.reap(5) == []  # not idle for a lease yet
    (task_b,) = wait_for(lambda: b.reap(5), what="B to reap A's task")
    assert time.monotonic() - fetched >= b.lease_ms / 1000
    assert (task_b.entry_id, task_b.task_id, task_b.deliveries) == (task_a.entry_id, "t1", 2)
    assert b.complete(task_b, 42) is True
    assert a.complete(task_a, -1) is False  # A lost the lease: nothing published
    assert a.renew([task_a.entry_id]) == [task_a.entry_id]
    assert_drained(client, a)
    assert [(r.task_id, r.decode()) for r in read_all(a, "c")] == [("t1", 42)]


def test_renew_reports_only_the_lost_ids(make_broker: MakeBroker) -> None:
    a, b = make_broker("A"), make_broker("B")
    a.submit("t1", 1, reply_to="c")
    a.submit("t2", 2, reply_to="c")
    t1, t2 = a.fetch(2)
    (stolen,) = wait_for(lambda: b.reap(1), what="B to reap one task")
    kept = t2 if stolen.entry_id == t1.entry_id else t1
    assert a.renew([t1.entry_id, t2.entry_id]) == [stolen.entry_id]
    assert a.renew([]) == []
    assert a.complete(kept, 0) is True
    assert a.complete(t1 if kept is t2 else t2, 0) is False
    assert b.complete(stolen, 0) is True


def test_renewing_keeps_a_task_past_the_lease(client: Any, make_broker: MakeBroker) -> None:
    a, b = make_broker("A"), make_broker("B")
    a.submit("slow", None, reply_to="c")
    (task,) = a.fetch(1)
    start = time.monotonic()
    while time.monotonic() - start < 3 * a.lease_ms / 1000:
        assert a.renew([task.entry_id]) == []
        assert b.reap(5) == []  # renewed just now: never idle for a lease
        time.sleep(0.02)
    assert client.exists(a.keys.alive("A"))
    # and once A stops renewing, B does take it: the lease was what kept it
    (taken,) = wait_for(lambda: b.reap(5), what="B to reap after A stopped renewing")
    assert taken.entry_id == task.entry_id
    assert b.complete(taken, "done")


def test_a_delivery_whose_reply_was_lost_is_reaped_back_by_its_own_consumer(
    client: Any, make_broker: MakeBroker
) -> None:
    """XREADGROUP ran on the server but its reply was lost (the connection dropped, a frozen server
    answering a closed socket): the entry is pending to A, which never saw it.  No one else may be
    running to reap it, so A's own reaper takes it back after the lease."""
    a = make_broker("A")
    a.setup()
    a.submit("t1", 1, reply_to="c")
    client.xreadgroup(a.group, "A", {a.keys.tasks: ">"}, count=1)  # delivered to A; the reply goes nowhere
    assert a.fetch(1, block_ms=None) == []
    (task,) = wait_for(lambda: a.reap(1), what="A to reap its own lost delivery")
    assert (task.task_id, task.deliveries) == ("t1", 2)
    assert a.complete(task, 2)
    assert [r.decode() for r in read_all(a, "c")] == [2]


def test_a_fenced_run_does_not_stop_its_consumer_from_running_the_task_again(make_broker: MakeBroker) -> None:
    """A remembers the tasks it answered, to refuse replays; a run whose result was fenced off was
    not an answer: when the task comes back (released by B), A runs it."""
    a, b = make_broker("A"), make_broker("B")
    a.submit("t1", 1, reply_to="c")
    (first,) = a.fetch(1)
    (stolen,) = wait_for(lambda: b.reap(1), what="B to reap A's task")
    assert a.complete(first, "late") is False  # fenced: A lost the lease
    assert b.release(stolen.entry_id)  # B's worker died
    (again,) = a.fetch(1, block_ms=None)
    assert again.entry_id == first.entry_id
    assert a.complete(again, "done")
    assert [r.decode() for r in read_all(a, "c")] == ["done"]


def test_a_running_entry_that_is_renewed_is_never_reaped_by_its_own_consumer(make_broker: MakeBroker) -> None:
    a = make_broker("A")
    a.submit("t1", 1, reply_to="c")
    (task,) = a.fetch(1)
    start = time.monotonic()
    while time.monotonic() - start < 2 * a.lease_ms / 1000:
        assert a.renew([task.entry_id]) == []
        assert a.reap(5) == []
        time.sleep(0.02)
    assert a.complete(task, 0)


def test_release_makes_a_task_available_at_once(client: Any, make_broker: MakeBroker) -> None:
    a, b = make_broker("A", lease_ms=60_000), make_broker("B", lease_ms=60_000)
    a.submit("t1", "x", reply_to="c")
    (task,) = a.fetch(1)
    start = time.monotonic()
    assert a.release(task.entry_id) is True
    (again,) = b.fetch(1, block_ms=None)
    assert time.monotonic() - start < 5  # nowhere near the 60 s lease
    assert (again.entry_id, again.deliveries) == (task.entry_id, 2)
    assert a.release(task.entry_id) is False  # B's now
    assert a.complete(task, "late") is False
    assert b.complete(again, "X") is True
    assert_drained(client, b)
    assert [r.decode() for r in read_all(b, "c")] == ["X"]


def test_a_released_task_is_reaped_at_once_too(make_broker: MakeBroker) -> None:
    a, b = make_broker("A", lease_ms=60_000), make_broker("B", lease_ms=60_000)
    a.submit("t1", "x", reply_to="c")
    (task,) = a.fetch(1)
    assert a.release(task.entry_id)
    (again,) = b.reap(1)
    assert again.entry_id == task.entry_id


# -- dead letters ---------------------------------------------------------------------


def test_a_task_abandoned_max_deliveries_times_is_dead_lettered(client: Any, make_broker: MakeBroker) -> None:
    a, b, c = (make_broker(name, max_deliveries=3) for name in "ABC")
    a.submit("poison", 1, reply_to="client")
    (first,) = a.fetch(1)
    (second,) = wait_for(lambda: b.reap(1), what="B to reap delivery 2")
    (third,) = wait_for(lambda: c.reap(1), what="C to reap delivery 3")
    assert [first.deliveries, second.deliveries, third.deliveries] == [1, 2, 3]
    # C abandons it too: the next reaper dead-letters it instead of a 4th delivery

    def reap_then_look() -> list[dict[bytes, bytes]]:
        assert a.reap(1) == []  # before the lease: nothing to take; after it: dead-lettered, not taken
        return dead_letters(client, a)

    (dead,) = wait_for(reap_then_look, what="the dead letter")
    assert a.fetch(1, block_ms=None) == []
    assert dead[b"reason"] == b"max deliveries"
    assert (dead[b"id"], dead[b"reply_to"], dead[b"deliveries"], dead[b"entry"]) == (
        b"poison", b"client", b"3", first.entry_id.encode(),
    )  # fmt: skip
    assert_drained(client, a)
    (result,) = read_all(a, "client")
    assert (result.task_id, result.status, result.reason) == ("poison", DEAD, "max deliveries")
    assert result.decode()["deliveries"] == 3
    assert c.complete(third, "too late") is False


def test_releases_count_as_deliveries(client: Any, make_broker: MakeBroker) -> None:
    """A task that kills every worker it meets (release after release) ends dead-lettered."""
    a = make_broker("A", max_deliveries=3)
    a.submit("crasher", 1, reply_to="client")
    seen = []
    for _ in range(5):
        tasks = a.fetch(1, block_ms=None)
        if not tasks:
            break
        seen.append(tasks[0].deliveries)
        assert a.release(tasks[0].entry_id)
    assert seen == [1, 2, 3]
    assert [d[b"reason"] for d in dead_letters(client, a)] == [b"max deliveries"]
    assert [r.status for r in read_all(a, "client")] == [DEAD]
    assert_drained(client, a)


# -- signatures -----------------------------------------------------------------------


def test_unsigned_or_forged_pickles_are_dead_lettered_unopened(
    client: Any, make_broker: MakeBroker, tmp_path: Path
) -> None:
    trap = tmp_path / "unpickled"
    worker = make_broker("A", codec="pickle", secret=SECRET)
    forger = make_broker("F", codec="pickle", secret="another key, also 16+ bytes")
    evil = pickle.dumps(Trap(trap))
    base = {**V2, "payload": evil, "codec": "pickle", "submitted_at": "0"}
    client.xadd(worker.keys.tasks, {"id": "unsigned", **base})
    client.xadd(worker.keys.tasks, {"id": "bogus", **base, "signature": b"0" * 64})
    forger.submit("forged", Trap(trap), reply_to="victim")  # signed, with the wrong key
    assert worker.fetch(10) == []
    assert not trap.exists()
    dead = dead_letters(client, worker)
    assert [(d[b"id"], d[b"reason"]) for d in dead] == [
        (b"unsigned", b"bad signature"), (b"bogus", b"bad signature"), (b"forged", b"bad signature"),
    ]  # fmt: skip
    assert dead[0][b"detail"] == b"the message is not signed"
    assert_drained(client, worker)
    # the client and task id a forger writes are the forger's: a `dead` result sent there could fail a
    # genuine task of that id while it still waits or runs, so nobody is told
    assert read_all(worker, "victim") == []
    assert not trap.exists()


def test_a_broker_without_a_key_refuses_pickles(client: Any, make_broker: MakeBroker, tmp_path: Path) -> None:
    trap = tmp_path / "unpickled"
    worker = make_broker("A", insecure=True)  # json, no secret
    signed = make_broker("S", codec="pickle", secret=SECRET)
    signed.submit("p", Trap(trap), reply_to="c")
    assert worker.fetch(1) == []
    assert not trap.exists()
    (dead,) = dead_letters(client, worker)
    assert dead[b"reason"] == b"codec refused"
    assert b"can run code" in dead[b"detail"]


def test_a_json_consumer_never_unpickles_even_what_its_key_signed(
    client: Any, make_broker: MakeBroker, tmp_path: Path
) -> None:
    trap = tmp_path / "unpickled"
    worker = make_broker("A")  # json, with the key
    make_broker("S", codec="pickle").submit("p", Trap(trap), reply_to="c")  # signed with the same key
    assert worker.fetch(1) == []
    assert not trap.exists()
    assert [d[b"reason"] for d in dead_letters(client, worker)] == [b"codec refused"]
    (told,) = read_all(worker, "c")  # an authentic task: its client is told why
    assert (told.status, told.reason) == (DEAD, "codec refused")


def test_signed_pickles_round_trip(client: Any, make_broker: MakeBroker) -> None:
    sender = make_broker("client", codec="pickle", secret=SECRET)
    worker = make_broker("A", codec="pickle", secret=SECRET)  # decodes what each task names: json or pickle
    value = {"when": (1, 2), "set": frozenset({1, 2}), "exc": KeyError("k")}
    sender.submit("p1", value, reply_to="me")
    (task,) = worker.fetch(1)
    assert task.codec == "pickle"
    got = task.decode()
    assert got["when"] == (1, 2) and got["set"] == frozenset({1, 2}) and isinstance(got["exc"], KeyError)
    assert worker.complete(task, {1, 2, 3})  # answered in the task's codec, signed
    fields = client.xrange(worker.keys.results("me"))[0][1]
    assert fields[b"codec"] == b"pickle" and len(fields[b"signature"]) == 64
    (result,) = sender.results("me")
    assert result.decode() == {1, 2, 3}


def test_with_a_key_plain_messages_must_be_signed_too(client: Any, make_broker: MakeBroker) -> None:
    worker = make_broker("A", secret=SECRET)
    client.xadd(worker.keys.tasks, {**V2, "id": "j", "payload": b"1"})
    assert worker.fetch(1) == []
    (dead,) = dead_letters(client, worker)
    assert dead[b"reason"] == b"bad signature"


def test_a_forged_result_is_rejected_unopened(client: Any, make_broker: MakeBroker, tmp_path: Path) -> None:
    trap = tmp_path / "unpickled"
    me = make_broker("client", codec="pickle", secret=SECRET)
    client.xadd(
        me.keys.results("me"), {"id": "t", "status": "ok", "codec": "pickle", "payload": pickle.dumps(Trap(trap))}
    )
    (result,) = me.results("me")
    assert (result.status, result.reason, result.payload) == (REJECTED, "bad signature", b"")
    with pytest.raises(BadSignature, match="rejected"):
        result.decode()
    assert not trap.exists()


def test_unknown_codec_and_malformed_entries_are_dead_lettered(client: Any, make_broker: MakeBroker) -> None:
    worker = make_broker("A", insecure=True)
    client.xadd(worker.keys.tasks, {**V2, "id": "x", "payload": b"1", "reply_to": "c", "codec": "yaml"})
    client.xadd(worker.keys.tasks, {**V2, "id": "y", "reply_to": "c"})
    client.xadd(worker.keys.tasks, {**V2, "id": "z", "payload": b"1", "expires": "soon"})
    client.xadd(worker.keys.tasks, {"id": "old", "payload": b"1", "reply_to": "c", "codec": "json"})  # protocol v1
    assert worker.fetch(5) == []
    assert [d[b"reason"] for d in dead_letters(client, worker)] == [
        b"unknown codec", b"malformed", b"malformed", b"unsupported protocol",
    ]  # fmt: skip
    assert_drained(client, worker)


# -- consumers, setup and errors ------------------------------------------------------


def test_leave_and_reaping_forget_gone_consumers(client: Any, make_broker: MakeBroker) -> None:
    a, b = make_broker("A"), make_broker("B")
    a.setup()
    b.setup()
    assert set(a.consumers()) <= {"A", "B"}
    a.submit("t1", 1, reply_to="c")
    a.submit("t2", 2, reply_to="c")
    (ta,), (tb,) = a.fetch(1), b.fetch(1)  # a consumer joins the group with its first entry
    assert a.consumers() == {"A": (True, 1), "B": (True, 1)}
    assert a.complete(ta, 0) and b.complete(tb, 0)
    a.leave()
    assert b.consumers() == {"B": (True, 0)}
    client.xgroup_createconsumer(b.keys.tasks, b.group, "ghost")  # never alive, holds nothing
    assert "ghost" in b.consumers()
    wait_for(lambda: b.reap(1) == [] and "ghost" not in b.consumers(), what="the ghost to be forgotten")


def test_fetch_recreates_a_deleted_group(client: Any, make_broker: MakeBroker) -> None:
    a = make_broker("A")
    a.setup()
    client.delete(a.keys.tasks)
    a.submit("t", 1, reply_to="c")
    (task,) = a.fetch(1)
    assert task.task_id == "t"


def test_errors_name_what_is_wrong(client: Any, redis_port: int, app: str) -> None:
    import redis

    with pytest.raises(BrokerError, match="decode_responses"):
        Broker(redis.Redis(port=redis_port, decode_responses=True), app)
    with pytest.raises(BrokerError, match="app name"):
        Broker(client, "a{b}")
    with pytest.raises(BrokerError, match="max_deliveries must be a positive integer"):
        Broker(client, app, max_deliveries=0, secret=SECRET)
    with pytest.raises(BrokerError, match="task_ttl_s=90000 is longer than dedup_ttl_s=86400"):
        Broker(client, app, task_ttl_s=90_000, secret=SECRET)
    broker = Broker(client, app, secret=SECRET)
    with pytest.raises(BrokerError, match="wait forever"):
        broker.fetch(1, block_ms=0)
    with pytest.raises(BrokerError, match="socket_timeout"):
        broker.fetch(1, block_ms=10_000)
    with pytest.raises(BrokerError, match="task id"):
        broker.submit("", 1, reply_to="c")
    with pytest.raises(BrokerError, match="reply_to"):
        broker.submit("t", 1, reply_to="")


def test_server_version_check() -> None:
    check_server_version("6.2.0")
    check_server_version("7.0.15")
    with pytest.raises(ServerTooOld, match=r"Redis 6\.0\.16 at h:1 is too old: prefork-redis needs Redis >= 6\.2"):
        check_server_version("6.0.16", "h:1")


def test_task_repr_hides_the_payload() -> None:
    task = Task("1-0", "t", "c", "json", b"secret stuff", 1)
    assert "secret stuff" not in repr(task)
