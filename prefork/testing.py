"""prefork's pytest plugin: leak checks, polling, and a contract suite per strategy.

Installed with prefork (entry point ``pytest11``).  For a plugin author::

    from prefork.testing import SerializerContract

    class TestMySerializer(SerializerContract):
        @pytest.fixture
        def serializer(self):
            return MySerializer()

Every contract is a class of tests against one fixture (``serializer``,
``transport``, ``resolver``, ``sink``, ``policy``); subclass it and provide the
fixture.  The fixture ``prefork_no_leaks`` fails a test that leaves a child
process (live or zombie) or an orphaned prefork process behind.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from typing import Any, TypeVar

import pytest

from prefork._task import Task
from prefork.strategies.scaling import Decision, PoolStats

T = TypeVar("T")

# -- processes ----------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, cmdline) for every process readable in /proc."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        # a zombie has no command line; its short name (comm) is all that is left
        table[pid] = (int(rest[1]), rest[0], cmd or stat[stat.index("(") + 1 : stat.rindex(")")])
    return table


def descendants(root: int, table: dict[int, tuple[int, str, str]] | None = None) -> set[int]:
    """Every process below ``root`` (children, grandchildren...)."""
    table = _proc_table() if table is None else table
    found: set[int] = set()
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return found


def prefork_orphans(table: dict[int, tuple[int, str, str]] | None = None) -> set[int]:
    """Processes titled ``prefork...`` (or ``<name> worker``) adopted by init."""
    table = _proc_table() if table is None else table
    return {
        pid
        for pid, (ppid, _, cmd) in table.items()
        if ppid == 1 and (cmd.startswith("prefork") or cmd.endswith((" worker", " forkserver")))
    }


def present_processes() -> set[int]:
    """Our descendants and the prefork orphans now: what a test found when it began
    (a server a session fixture started, say), which it cannot have leaked."""
    table = _proc_table()
    return descendants(os.getpid(), table) | prefork_orphans(table)


def leaked_processes(before: set[int], deadline: float = 5.0) -> list[str]:
    """Our descendants and prefork orphans not in ``before`` (see
    ``present_processes``), still there after ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        table = _proc_table()
        leaks = sorted((descendants(os.getpid(), table) | prefork_orphans(table)) - before)
        if not leaks or time.monotonic() > end:
            return [f"{pid} ppid={table[pid][0]} state={table[pid][1]} {table[pid][2]!r}" for pid in leaks if pid in table]
        time.sleep(0.02)


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def reaped(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child; true once it is gone.

    A process that is not our child yet (an orphan on its way to this subreaper,
    its old parent still being reaped) is waited for, not taken as gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")
    return done == pid


def wait_for_file(path: str, deadline: float = 10.0) -> int:
    """A task that blocks until ``path`` exists (a gate the test opens); returns its pid."""
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"the gate {path} never opened")
        time.sleep(0.005)
    return os.getpid()


_PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def prefork_subreaper() -> Iterator[None]:
    """Make the test process a subreaper: orphans of the test (a pool's workers after
    their fork server died, a task's grandchildren) re-parent to it, so the test can
    check them and reap them with :func:`reaped` instead of leaving them to init."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def prefork_no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a child process or a prefork orphan behind."""
    before = present_processes()
    yield
    leaks = leaked_processes(before)
    assert not leaks, "processes left behind (live or zombie):\n" + "\n".join(leaks)


# -- contracts ----------------------------------------------------------------------

PLAIN_VALUES: list[Any] = [None, True, 0, -1, 2**40, 1.5, "", "text é", [1, "a"], {"k": [1, 2]}, []]


class SerializerContract:
    """What every serializer must do."""

    @pytest.fixture
    def serializer(self) -> Any:
        raise NotImplementedError("provide a `serializer` fixture")

    @pytest.mark.parametrize("value", PLAIN_VALUES, ids=repr)
    def test_plain_data_round_trips(self, serializer: Any, value: Any) -> None:
        data = serializer.dumps(value)
        assert isinstance(data, bytes)
        assert serializer.loads(data) == value

    def test_the_call_envelope_round_trips(self, serializer: Any) -> None:
        method, args, kwargs = serializer.loads(serializer.dumps(("mod:fn", [1, "x"], {"k": 2})))
        assert (method, list(args), kwargs) == ("mod:fn", [1, "x"], {"k": 2})

    def test_has_name_and_objects_flag(self, serializer: Any) -> None:
        assert isinstance(serializer.name, str) and serializer.name
        assert isinstance(serializer.objects, bool)

    def test_objects_flag_is_truthful(self, serializer: Any) -> None:
        if not serializer.objects:
            pytest.skip("plain-data serializer")
        exc = serializer.loads(serializer.dumps(ValueError("boom")))
        assert isinstance(exc, ValueError) and str(exc) == "boom"
        assert serializer.loads(serializer.dumps(math.floor)) is math.floor


class TransportContract:
    """What every transport must do: whole frames, in order, both ways, and EOF.

    A frame read needs to stay valid only until the channel's next read: these
    tests copy what they keep."""

    @pytest.fixture
    def transport(self) -> Any:
        raise NotImplementedError("provide a `transport` fixture")

    @staticmethod
    def _read_frames(parent: Any, count: int, timeout: float = 10.0) -> list[bytes]:
        frames: list[bytes] = []
        end = time.monotonic() + timeout
        while len(frames) < count:
            left = end - time.monotonic()
            assert left > 0, f"only {len(frames)} of {count} frames arrived"
            select.select([parent.fileno()], [], [], left)
            frames.extend(bytes(f) for f in parent.read())  # a frame is valid until the next read only
        return frames

    @pytest.mark.parametrize("size", [0, 1, 1000, 70000, 3 * 1024 * 1024])
    def test_frames_cross_whole_both_ways(self, transport: Any, size: int) -> None:
        a, b = transport.socketpair()
        parent, child = transport.parent_channel(a), transport.child_channel(b)
        try:
            payload = os.urandom(size)
            parent.send(payload)
            end = time.monotonic() + 10
            got: list[bytes | None] = []
            reader = threading.Thread(target=lambda: got.append(child.recv()))
            reader.start()
            while parent.wants_write():
                assert time.monotonic() < end, "the parent channel never drained"
                select.select([], [parent.fileno()], [], 1.0)
                parent.flush()
            reader.join(10)
            assert got == [payload]
            writer = threading.Thread(target=lambda: (child.send(payload), child.send(b"second")))
            writer.start()
            try:
                assert self._read_frames(parent, 2) == [payload, b"second"]
            finally:
                writer.join(10)
        finally:
            parent.close()
            child.close()

    def test_end_of_stream(self, transport: Any) -> None:
        a, b = transport.socketpair()
        parent, child = transport.parent_channel(a), transport.child_channel(b)
        child.send(b"last words")
        child.close()
        assert self._read_frames(parent, 1) == [b"last words"]
        with pytest.raises(EOFError):
            end = time.monotonic() + 5
            while time.monotonic() < end:
                select.select([parent.fileno()], [], [], 1.0)
                assert parent.read() == []
        parent.close()
        a2, b2 = transport.socketpair()
        parent2, child2 = transport.parent_channel(a2), transport.child_channel(b2)
        parent2.close()
        assert child2.recv() is None
        child2.close()


class ResolverContract:
    """What every resolver must do: ``None`` for names it does not know."""

    @pytest.fixture
    def resolver(self) -> Any:
        raise NotImplementedError("provide a `resolver` fixture")

    def test_unknown_name_is_none(self, resolver: Any) -> None:
        if getattr(resolver, "catch_all", False):
            assert callable(resolver.resolve("surely_no_such_method_4711"))
            return
        assert resolver.resolve("surely_no_such_method_4711") is None

    def test_private_names_are_not_exposed(self, resolver: Any) -> None:
        assert resolver.resolve("__class__") is None


class SinkContract:
    """What every result sink must do with attach / claim / deliver."""

    @pytest.fixture
    def sink(self) -> Any:
        raise NotImplementedError("provide a `sink` fixture")

    def test_attach_claim_deliver(self, sink: Any) -> None:
        tasks = [Task(i, "m", (), {}) for i in range(1, 4)]
        for t in tasks:
            sink.attach(t)
            assert sink.claim(t) is True
        sink.deliver(tasks[0], True, 42)
        sink.deliver(tasks[1], False, ValueError("x"))
        sink.deliver(tasks[2], False, CancelledError())
        sink.close()


class ScalingContract:
    """What every scaling policy must do, over a grid of snapshots."""

    @pytest.fixture
    def policy(self) -> Any:
        raise NotImplementedError("provide a `policy` fixture")

    def test_decisions_stay_in_bounds(self, policy: Any) -> None:
        top = policy.max_workers()
        assert top >= 0
        for alive in range(0, top + 2):
            for idle in range(0, alive + 1):
                for queued in (0, 1, 5, 100):
                    stats = PoolStats(
                        now=100.0, alive=alive, booting=0, idle=idle, busy=alive - idle,
                        queued=queued, spawned_total=alive, last_spawn=0.0, longest_idle=50.0,
                    )
                    d = policy.decide(stats)
                    assert isinstance(d, Decision)
                    assert d.spawn >= 0 and d.retire >= 0
                    assert not (d.spawn and d.retire), f"spawn and retire at once for {stats}"
                    assert alive + d.spawn <= max(top, alive), f"{d} exceeds max_workers={top} for {stats}"
                    assert d.retire <= idle, f"{d} retires a busy worker for {stats}"
                    assert d.next_tick is None or d.next_tick >= 0
