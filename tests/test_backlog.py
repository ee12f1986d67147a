"""The ``backlog`` scaling policy (``prefork.strategies.backlog``) and the reading it
lives on, the listen queue's length (``prefork._listen_queue``).

- the reading, with real sockets: clients nobody accepts are counted, accepting
  them lowers the count, IPv4, IPv6 and dual stack; ``TCP_INFO`` and
  ``/proc/net/tcp[6]`` agree, and the fallback is taken when the kernel refuses
  ``TCP_INFO``; other sockets and misuse; what it costs;
- the policy: the contract suite every built-in passes, its options and their
  errors, property tests over random snapshots and over whole runs, ``resized``,
  and a simulation through the real ``Scaler`` absorbing a burst;
- the docs section ("Scaling by backlog", for docs/profiles/mpm.md), block by
  block: ``<!-- config -->`` loaded, ``<!-- run -->`` run, ``<!-- shell -->`` run
  (``prefork simulate`` in this process, its ``<!-- output -->`` compared; ``ss``
  against a listener of the test), and its table of options against the class.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import re
import shlex
import shutil
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefork.plugins
from prefork import _listen_queue
from prefork._listen_queue import listen_backlog, listen_queue
from prefork._scaler import Scaler, evolve_policy
from prefork._workers import Census
from prefork.config import load_config
from prefork.errors import ConfigError, OptionError
from prefork.plugins import build_plugin_manager, build_registry
from prefork.simulate import Burst, Service, Trace, simulate
from prefork.strategies.backlog import BacklogPolicy
from prefork.strategies.registry import StrategyRegistry
from prefork.strategies.scaling import Decision, PoolStats
from prefork.testing import ScalingContract, wait_until

ROOT = Path(__file__).resolve().parents[1]
MODULE = "prefork.strategies.backlog"
WAIT = 10.0  # seconds for the kernel to queue a handshake; generous for a loaded machine


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backlog`` among the built-in plugin modules, as ``prefork/plugins.py`` lists them
    once the line is added there (then this changes nothing)."""
    if MODULE not in prefork.plugins.BUILTIN_PLUGINS:
        monkeypatch.setattr(prefork.plugins, "BUILTIN_PLUGINS", (*prefork.plugins.BUILTIN_PLUGINS, MODULE))


# -- the listen queue, read from the kernel ----------------------------------------------------


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback here")
SOMAXCONN = int(Path("/proc/sys/net/core/somaxconn").read_text())


@contextlib.contextmanager
def listener(host: str, backlog: int = 50, *, dualstack: bool = False) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, 0), family=family, backlog=backlog, dualstack_ipv6=dualstack)
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def clients(address: tuple[str, int], n: int) -> Iterator[list[socket.socket]]:
    """``n`` connections to ``address`` that nobody accepts (non-blocking connects: past a
    full queue the kernel drops the handshake, and a blocking connect would wait for it)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            c = socket.socket(family, socket.SOCK_STREAM)
            socks.append(c)
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(address)
        yield socks
    finally:
        for c in socks:
            c.close()


def settles_at(sock: socket.socket, n: int, method: _listen_queue.Method = "auto") -> None:
    wait_until(lambda: listen_backlog(sock, method=method) == n, timeout=WAIT, interval=0.002,
               what=f"{n} connections waiting (now {listen_backlog(sock, method=method)}, method {method})")


CASES = [
    pytest.param("127.0.0.1", "127.0.0.1", False, id="ipv4"),
    pytest.param("::1", "::1", False, id="ipv6", marks=needs_ipv6),
    pytest.param("::", "127.0.0.1", True, id="dual-stack, an IPv4 client", marks=needs_ipv6),
]


@pytest.mark.parametrize("n", [1, 7, 50])
@pytest.mark.parametrize(("host", "client_host", "dualstack"), CASES)
def test_connections_nobody_accepted_are_counted_and_accepting_lowers_the_count(
        host: str, client_host: str, dualstack: bool, n: int) -> None:
    with listener(host, 50, dualstack=dualstack) as sock:
        assert listen_queue(sock) == (0, min(50, SOMAXCONN))
        assert listen_backlog(sock, method="proc") == 0
        port = sock.getsockname()[1]
        with clients((client_host, port), n):
            settles_at(sock, n)
            assert listen_queue(sock, method="tcp_info") == (n, min(50, SOMAXCONN))
            assert listen_queue(sock, method="proc") == (n, None)  # /proc knows no limit
            some = (n + 1) // 2
            accepted = [sock.accept()[0] for _ in range(some)]
            try:
                # accept() takes a connection off the queue before it returns: no wait needed
                assert listen_backlog(sock) == listen_backlog(sock, method="proc") == n - some
                accepted += [sock.accept()[0] for _ in range(n - some)]
                assert listen_backlog(sock) == listen_backlog(sock, method="proc") == 0
            finally:
                for conn in accepted:
                    conn.close()


def test_a_full_queue_holds_its_limit_plus_one_and_no_more() -> None:
    """What docs and docstring say: past ``backlog + 1`` the kernel drops handshakes."""
    with listener("127.0.0.1", 4) as sock, clients(sock.getsockname(), 12):
        settles_at(sock, 5)
        assert listen_queue(sock) == (5, 4)
        assert listen_backlog(sock, method="proc") == 5


def test_the_proc_reading_is_taken_where_the_kernel_refuses_tcp_info(monkeypatch: pytest.MonkeyPatch) -> None:
    with listener("127.0.0.1") as sock, clients(sock.getsockname(), 3):
        settles_at(sock, 3, "tcp_info")
        # an option number no kernel knows: the real getsockopt fails with ENOPROTOOPT
        monkeypatch.setattr(_listen_queue, "_SOL_TCP_INFO", 0x7FFF)
        with pytest.raises(OSError) as refused:
            listen_backlog(sock, method="tcp_info")  # forced: no fallback
        assert refused.value.errno == 92  # ENOPROTOOPT
        assert listen_queue(sock) == (3, None)  # auto: the /proc reading
        monkeypatch.setattr(_listen_queue, "_SOL_TCP_INFO", None)  # a platform without TCP_INFO
        assert listen_queue(sock) == (3, None)
        with pytest.raises(OSError, match="no TCP_INFO"):
            listen_backlog(sock, method="tcp_info")


def test_no_reading_is_none_under_auto_and_an_error_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    with listener("127.0.0.1") as sock:
        monkeypatch.setattr(_listen_queue, "_SOL_TCP_INFO", None)
        real_open = open

        def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
            if str(path).startswith("/proc/self/net/"):
                raise FileNotFoundError(2, "No such file or directory", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_proc)
        assert listen_backlog(sock) is None
        with pytest.raises(FileNotFoundError):
            listen_backlog(sock, method="proc")


def test_a_socket_missing_from_proc_is_none_under_auto_and_an_error_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/self/net shows this process's network namespace; a socket of another one has no row."""
    with listener("127.0.0.1") as sock:
        monkeypatch.setattr(_listen_queue, "_SOL_TCP_INFO", None)
        monkeypatch.setattr(_listen_queue, "_proc_address", lambda s: b"0200007F:0001")  # no such row
        assert listen_backlog(sock) is None
        with pytest.raises(OSError, match=r"no LISTEN row for this socket in /proc/self/net/tcp"):
            listen_backlog(sock, method="proc")


@pytest.mark.parametrize("kind", ["unix stream", "unix dgram", "udp"])
def test_other_sockets_have_no_reading(kind: str, tmp_path: Path) -> None:
    if kind == "unix stream":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / "s"))
        sock.listen(50)
    elif kind == "unix dgram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    with sock:
        for method in ("auto", "tcp_info", "proc"):
            assert listen_backlog(sock, method=method) is None


def test_misuse_is_refused_in_one_line() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        for method in ("auto", "tcp_info", "proc"):
            with pytest.raises(ValueError, match="not listening"):
                listen_backlog(bound, method=method)
    with listener("127.0.0.1") as sock, socket.create_connection(sock.getsockname()) as client:
        with pytest.raises(ValueError, match=r"not listening \(TCP state 1\)"):  # ESTABLISHED
            listen_backlog(client)
        with pytest.raises(ValueError, match=r"method='tcp'\): use 'auto', 'tcp_info' or 'proc'"):
            listen_backlog(sock, method="tcp")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"takes a socket\.socket, not int"):
            listen_backlog(sock.fileno())  # type: ignore[arg-type]
        sock.close()
        with pytest.raises(ValueError, match="the socket is closed"):
            listen_backlog(sock)


# -- the policy: contract, options, registration ----------------------------------------------------

OPTION_SETS = [
    {},
    {"min_servers": 0, "max_servers": 3},
    {"min_servers": 2, "max_servers": 6, "max_waiting": 3, "step": 2, "max_rate": 4, "idle_timeout": 5.0},
    {"min_servers": 1, "max_servers": 1},
    {"min_servers": 4, "max_servers": 40, "idle_timeout": 0, "tick": 0.25},
]


class TestBacklogContract(ScalingContract):
    @pytest.fixture(params=OPTION_SETS, ids=[str(o) for o in OPTION_SETS])
    def policy(self, request: pytest.FixtureRequest) -> Any:
        return BacklogPolicy(**request.param)


def test_it_registers_through_the_hook_as_backlog() -> None:
    from prefork.strategies import backlog

    registry = StrategyRegistry()
    registry._set_plugin(MODULE)
    backlog.prefork_register_strategies(registry)
    assert registry.get("scaling", "backlog") is BacklogPolicy
    assert [(r.kind, r.name, r.plugin) for r in registry] == [("scaling", "backlog", MODULE)]


@pytest.mark.usefixtures("registered")
def test_a_config_names_it_and_its_options_reach_it() -> None:
    registry = build_registry(build_plugin_manager(autoload=False))
    assert "backlog" in registry.names("scaling") and "spare" in registry.names("scaling")
    config = load_config(None, {"profile": "mpm", "scaling": {"name": "backlog", "max_servers": 12, "tick": 2}})
    policy = config.create("scaling")
    assert policy == BacklogPolicy(max_servers=12, tick=2.0) and policy.max_workers() == 12
    assert isinstance(policy.tick, float)


BAD = [
    ({"min_servers": -1}, "scaling.min_servers = -1: must be >= 0"),
    ({"max_servers": 0}, "scaling.max_servers = 0: must be >= 1"),
    ({"max_waiting": 1.5}, "scaling.max_waiting = 1.5: must be an integer"),
    ({"step": True}, "scaling.step = True: must be an integer"),
    ({"step": 0}, "scaling.step = 0: must be >= 1"),
    ({"max_rate": 0}, "scaling.max_rate = 0: must be >= 1"),
    ({"min_servers": 5, "max_servers": 4}, "scaling.min_servers = 5: must be <= max_servers (4)"),
    ({"step": 8, "max_rate": 4}, "scaling.step = 8: must be <= max_rate (4)"),
    ({"idle_timeout": -1}, "scaling.idle_timeout = -1: must be a finite number of seconds >= 0"),
    ({"idle_timeout": math.nan}, "scaling.idle_timeout = nan: must be a finite number of seconds >= 0"),
    ({"idle_timeout": math.inf}, "scaling.idle_timeout = inf: must be a finite number of seconds >= 0"),
    ({"idle_timeout": "10"}, "scaling.idle_timeout = '10': must be a number of seconds"),
    ({"tick": 0}, "scaling.tick = 0: must be a finite number of seconds >= 0.001"),
    ({"tick": False}, "scaling.tick = False: must be a number of seconds"),
]


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(("options", "message"), BAD, ids=[m for _, m in BAD])
def test_a_bad_option_is_refused_naming_where_it_came_from(options: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(OptionError) as direct:
        BacklogPolicy(**options)
    assert f"scaling.{direct.value}" == message
    path = tmp_path / "prefork.toml"
    lines = [f"{k} = {_toml(v)}" for k, v in options.items()]
    path.write_text("[scaling]\nname = \"backlog\"\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    assert str(from_file.value) == f"{path}: {message}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, {"scaling": {"name": "backlog", **options}})


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_an_unknown_option_is_refused_with_the_known_ones(registered: None) -> None:
    with pytest.raises(ConfigError, match=r"scaling.min_spare: unknown option.*options of 'backlog': min_servers, "
                                          r"max_servers, max_waiting, step, max_rate, idle_timeout, tick"):
        load_config(None, {"scaling": {"name": "backlog", "min_spare": 2}})


def test_options_change_at_run_time_through_its_own_checks() -> None:
    policy = BacklogPolicy(min_servers=2, max_servers=8)
    assert evolve_policy(policy, {"max_waiting": 3, "tick": 2}) == BacklogPolicy(min_servers=2, max_servers=8,
                                                                                  max_waiting=3, tick=2.0)
    with pytest.raises(OptionError, match=r"min_servers = 9: must be <= max_servers \(8\)"):
        evolve_policy(policy, {"min_servers": 9})
    with pytest.raises(TypeError, match="has no option 'min_spare'"):
        evolve_policy(policy, {"min_spare": 1})


@pytest.mark.parametrize(
    ("start", "delta", "limit", "expect"),
    [
        ((2, 16), 3, 64, (5, 16)),
        ((2, 4), 5, 64, (7, 7)),  # max_servers grows with min_servers
        ((2, 4), 100, 10, (10, 10)),  # within the pool's size
        ((3, 8), -10, 64, (1, 8)),  # shrinking stops at one worker
        ((0, 8), -1, 64, (0, 8)),  # ... or at 0 if that is what it was
        ((0, 8), 2, 64, (2, 8)),
        ((2, 60), 1, 8, (3, 8)),  # a ceiling above the limit comes down to it
    ],
)
def test_resized_moves_min_servers_and_lifts_max_servers_within_the_limit(
        start: tuple[int, int], delta: int, limit: int, expect: tuple[int, int]) -> None:
    new = BacklogPolicy(min_servers=start[0], max_servers=start[1], idle_timeout=7.0).resized(delta, limit)
    assert (new.min_servers, new.max_servers) == expect
    assert new.idle_timeout == 7.0


# -- the policy's decisions ------------------------------------------------------------------------


def snap(**kw: Any) -> PoolStats:
    base: dict[str, Any] = {"now": 100.0, "alive": 0, "booting": 0, "idle": 0, "busy": 0, "queued": 0}
    base.update(kw)
    base["alive"] = base["booting"] + base["idle"] + base["busy"]
    return PoolStats(**base)


def test_it_starts_with_min_servers_and_replaces_a_dead_one_at_once_whatever_the_tick() -> None:
    policy = BacklogPolicy(min_servers=3, max_servers=8)
    assert policy.decide(snap()) == Decision(spawn=3, next_tick=1.0)
    assert policy.decide(snap(idle=2, last_spawn=99.99, spawned_total=3)).spawn == 1


def test_it_grows_while_work_waits_beyond_idle_and_booting_workers_doubling_per_tick() -> None:
    policy = BacklogPolicy(min_servers=2, max_servers=40, max_waiting=2, step=2, max_rate=16)
    assert policy.decide(snap(busy=2, queued=2)).spawn == 0  # 2 wait: not more than max_waiting
    assert policy.decide(snap(idle=2, busy=2, queued=4)).spawn == 0  # 2 idle ones take 2 of 4: 2 wait
    assert policy.decide(snap(idle=2, busy=2, queued=5)).spawn == 2  # 3 wait
    assert policy.decide(snap(booting=3, busy=2, queued=5)).spawn == 0  # 3 booting ones will take 3 of 5
    rate, forks, rates = 1, list[int](), list[int]()
    for tick in range(6):  # 100 connections wait throughout, one look a second
        d = policy.decide(snap(now=100.0 + tick, busy=2 + sum(forks), queued=100, last_spawn=99.0 + tick,
                               spawn_rate=rate))
        forks.append(d.spawn)
        rate = d.spawn_rate
        rates.append(rate)
    assert forks == [2, 4, 8, 16, 8, 0]  # step, doubling, max_rate, then max_servers = 40 reached
    assert rates == [2, 4, 8, 8, 8, 1]  # step * 8 = max_rate: the doubling stops; at the ceiling it starts over
    assert policy.decide(snap(busy=40, queued=100, spawn_rate=rate)) == Decision(next_tick=1.0)  # at the ceiling


def test_one_batch_per_tick_the_pace_kept_between_looks() -> None:
    policy = BacklogPolicy(min_servers=1, max_servers=20, tick=1.0)
    soon = policy.decide(snap(busy=5, queued=9, last_spawn=99.6, spawn_rate=4))
    assert (soon.spawn, soon.spawn_rate) == (0, 4) and soon.next_tick == pytest.approx(0.6)  # looks again when due
    due = policy.decide(snap(now=100.6, busy=5, queued=9, last_spawn=99.6, spawn_rate=4))
    assert due.spawn == 4 and due.spawn_rate == 8


def test_never_more_forks_than_work_waits() -> None:
    policy = BacklogPolicy(min_servers=1, max_servers=20, step=8, max_rate=8)
    assert policy.decide(snap(busy=3, queued=3)).spawn == 3


def test_with_no_worker_any_waiting_work_forks_one_even_under_max_waiting() -> None:
    policy = BacklogPolicy(min_servers=0, max_servers=4, max_waiting=5)
    assert policy.decide(snap(queued=1)).spawn == 1
    assert policy.decide(snap()).spawn == 0  # nothing waits, nothing kept


def test_idle_workers_retire_one_per_tick_once_nothing_waits_down_to_min_servers() -> None:
    policy = BacklogPolicy(min_servers=2, max_servers=8, idle_timeout=10.0, tick=1.0)
    assert policy.decide(snap(idle=4, busy=1, longest_idle=10.0)) == Decision(retire=1, next_tick=1.0)
    assert policy.decide(snap(idle=4, busy=1, longest_idle=9.5)) == Decision(next_tick=0.5)  # due then
    assert policy.decide(snap(idle=4, busy=1, longest_idle=3.0)) == Decision(next_tick=1.0)
    assert policy.decide(snap(idle=4, busy=1, queued=1, longest_idle=50.0)).retire == 0  # something waits
    assert policy.decide(snap(idle=2, longest_idle=50.0)).retire == 0  # min_servers
    assert BacklogPolicy(idle_timeout=0).decide(snap(idle=9, longest_idle=1e6)).retire == 0  # never


def test_a_lowered_ceiling_retires_idle_surplus_at_once_never_a_busy_worker() -> None:
    policy = BacklogPolicy(min_servers=1, max_servers=4)
    assert policy.decide(snap(idle=3, busy=4)).retire == 3
    assert policy.decide(snap(idle=1, busy=6)).retire == 1
    assert policy.decide(snap(busy=7, queued=10)) == Decision(next_tick=1.0)


policies = st.builds(
    lambda lo, extra, waiting, step, rate_extra, idle, tick: BacklogPolicy(
        min_servers=lo, max_servers=max(1, lo + extra), max_waiting=waiting, step=step, max_rate=step + rate_extra,
        idle_timeout=idle, tick=tick),
    st.integers(0, 10), st.integers(0, 30), st.integers(0, 20), st.integers(1, 8), st.integers(0, 40),
    st.sampled_from([0.0, 0.5, 10.0, 60.0]), st.sampled_from([0.001, 0.25, 1.0, 5.0]),
)


@st.composite
def pool_stats(draw: st.DrawFn) -> PoolStats:
    now = draw(st.floats(0, 1e6, allow_nan=False))
    booting, idle, busy = (draw(st.integers(0, 60)) for _ in range(3))
    return PoolStats(
        now=now, alive=booting + idle + busy, booting=booting, idle=idle, busy=busy,
        queued=draw(st.integers(0, 10_000)), spawned_total=draw(st.integers(0, 1000)),
        last_spawn=draw(st.one_of(st.just(-math.inf), st.floats(0, now))),
        longest_idle=draw(st.floats(0, 1e4)) if idle else 0.0, spawn_rate=draw(st.integers(-3, 1 << 20)),
    )


@settings(max_examples=2000, deadline=None)
@given(policies, pool_stats())
def test_no_snapshot_makes_it_overshoot_retire_a_busy_worker_or_go_below_min_servers(
        policy: BacklogPolicy, stats: PoolStats) -> None:
    d = policy.decide(stats)
    assert d.spawn >= 0 and d.retire >= 0 and not (d.spawn and d.retire)
    assert d.retire <= stats.idle, "a busy or booting worker retired"
    if d.spawn:
        assert stats.alive + d.spawn <= policy.max_servers, "beyond max_servers"
        assert d.spawn <= max(policy.max_rate, policy.min_servers - stats.alive), "more than max_rate in a tick"
    if d.retire:
        assert stats.alive - d.retire >= min(policy.min_servers, stats.alive), "below min_servers"
        if stats.alive <= policy.max_servers:
            assert d.retire == 1 and stats.queued == 0, "retired more than one, or while work waits"
    assert d.next_tick is not None and 0 <= d.next_tick <= policy.tick
    assert 1 <= d.spawn_rate <= max(1, stats.spawn_rate) * 2, "the carried pace ran away"
    assert d.spawn_rate * policy.step <= max(2 * policy.max_rate, stats.spawn_rate * policy.step)


class Event(NamedTuple):
    dt: float  # seconds since the last look
    arrivals: int  # connections that came
    served: int  # busy workers that finished one
    booted: int  # booting workers that became ready
    died: int  # workers that died (idle first)


events = st.lists(
    st.builds(Event, st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0, 20.0]), st.integers(0, 40), st.integers(0, 20),
              st.integers(0, 20), st.integers(0, 2)),
    min_size=1, max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies, events)
def test_whole_runs_through_the_scaler_keep_every_bound(policy: BacklogPolicy, run: list[Event]) -> None:
    """A pool driven by the supervisor's own Scaler through random traffic: never more than
    max_servers, never a busy worker retired, never below min_servers through a retirement,
    never more than one fork batch per tick, and every death below min_servers refilled at once."""
    scaler = Scaler(policy)
    booting = idle = busy = queued = 0
    idle_since: list[float] = []  # per idle worker
    now = 0.0
    last_batch = -math.inf
    for ev in run:
        now += ev.dt
        queued += ev.arrivals
        done = min(ev.served, busy)
        busy -= done
        idle += done
        idle_since += [now] * done
        up = min(ev.booted, booting)
        booting -= up
        idle += up
        idle_since += [now] * up
        dead = min(ev.died, booting + idle + busy)
        for _ in range(dead):
            if idle:
                idle -= 1
                idle_since.pop()
            elif busy:
                busy -= 1
            else:
                booting -= 1
        take = min(queued, idle)  # dispatch (accept): the longest idle ones last
        queued -= take
        idle -= take
        busy += take
        del idle_since[len(idle_since) - take:]
        if dead:
            scaler.soon()
        if not scaler.due(now, queued):
            continue
        alive = booting + idle + busy
        longest = now - min(idle_since) if idle_since else 0.0
        step = scaler.tick(now, Census(alive, booting, idle, busy, 0, longest), queued)
        assert not (step.spawn and step.retire)
        assert alive + step.spawn <= max(policy.max_servers, alive)
        assert step.retire <= idle
        if step.retire and alive <= policy.max_servers:
            assert alive - step.retire >= policy.min_servers
        if alive < policy.min_servers:
            assert step.spawn == policy.min_servers - alive, "a dead worker not replaced at once"
        elif step.spawn:
            assert now - last_batch >= policy.tick - 1e-9, "two fork batches within a tick"
            last_batch = now
        for _ in range(step.spawn):
            scaler.spawned(now)
        booting += step.spawn
        idle_since.sort()
        idle -= step.retire
        del idle_since[: step.retire]  # the longest idle go first
        assert booting + idle + busy <= max(policy.max_servers, alive)


def test_persistent_waiting_reaches_max_servers_in_log2_ticks() -> None:
    policy = BacklogPolicy(min_servers=1, max_servers=64, max_rate=64)
    scaler = Scaler(policy)
    alive, now, ticks = 0, 0.0, 0
    while alive < 64:
        step = scaler.tick(now, Census(alive, 0, 0, alive, 0, 0.0), 1000)
        for _ in range(step.spawn):
            scaler.spawned(now)
        alive += step.spawn
        now += 1.0
        ticks += 1
        assert ticks <= 10
    assert ticks == 7  # the start (min_servers = 1), then 1 + 2 + 4 + 8 + 16 + 32 = 63 more in 6 ticks


# -- a burst, simulated through the real Scaler ----------------------------------------------------------


def test_a_burst_is_absorbed_in_a_few_ticks_and_the_pool_shrinks_back() -> None:
    """Quiet traffic (one 0.2 s request every 2 s), then 60 one-second requests at once at
    20 s.  Two workers alone would take 30 s to serve the burst; the policy forks 1, 2, 4,
    8, 16 at one-second ticks and the queue is empty 5 s later; from 10 s after the last
    request (idle_timeout) the pool shrinks one worker a second, back to min_servers."""
    rows = [(float(t), 0.2) for t in range(0, 60, 2)] + [(20.0, 1.0)] * 60
    trace = Trace.from_rows(rows, duration=120.0, bursts=[Burst(20.0, 60)])
    policy = BacklogPolicy(min_servers=2, max_servers=40, idle_timeout=10.0, tick=1.0)
    result = simulate(policy, trace)
    fixed = simulate({"name": "fixed", "workers": 2}, trace)

    (burst,) = result.bursts
    assert burst.absorbed_after is not None and burst.absorbed_after <= 5.0
    assert fixed.bursts[0].absorbed_after is not None and fixed.bursts[0].absorbed_after >= 29.0
    forks_in_burst = [t for t in result.fork_times if t >= 20.0]
    assert [forks_in_burst.count(20.0 + s) for s in range(5)] == [1, 2, 4, 8, 16]  # one batch a tick, doubling
    assert result.peak_workers == 33 <= policy.max_servers
    assert result.unfinished == 0
    assert result.series.workers[-1] == policy.min_servers  # back down
    shrink = [t for t in result.retire_times if t > 25.0]
    assert len(shrink) == 31 and all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(shrink))
    assert shrink[0] >= 24.0 + 10.0  # not before idle_timeout after the burst's workers went idle


# -- docs: the "Scaling by backlog" section ---------------------------------------------------------------


class Block(NamedTuple):
    line: int
    mark: str
    lang: str
    code: str


def _section(root: Path = ROOT) -> tuple[str, str]:
    """The section in docs/profiles/mpm.md, up to the next heading."""
    page = root / "docs" / "profiles" / "mpm.md"
    text = page.read_text(encoding="utf-8")
    start = text.index("### Scaling by backlog")
    offset = text.count("\n", 0, start)
    lines = text[start:].splitlines()
    fenced = False
    for n, line in enumerate(lines[1:], 1):  # up to the next heading of level 1 to 3, outside code
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,3} ", line):
            lines = lines[:n]
            break
    return f"{page.relative_to(root)}:{offset}", "\n".join(lines) + "\n"


WHERE, SECTION = _section()
_OFFSET = int(WHERE.rpartition(":")[2])
DOC = WHERE.rpartition(":")[0]


def _blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        mark = re.match(r"^<!-- (.*?) -->\s*$", lines[i - 1]) if i else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        found.append(Block(_OFFSET + i + 1, mark.group(1) if mark else "", fence.group(1),
                           textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"))
        i = end + 1
    return found


BLOCKS = _blocks(SECTION)


def _after(block: Block) -> Block | None:
    i = BLOCKS.index(block)
    return BLOCKS[i + 1] if i + 1 < len(BLOCKS) and BLOCKS[i + 1].mark == "output" else None


def test_the_section_is_found_once_pasted_into_the_mpm_page(tmp_path: Path) -> None:
    """Once docs/profiles/mpm.md holds it, this module runs it there, up to the next heading."""
    (tmp_path / "docs" / "profiles").mkdir(parents=True)
    own = _section()[1]
    page = f"# mpm\n\n## Deploying\n\n### Harakiri\n\ntext\n\n{own}\n### Upgrades\n\n```sh\nkill -USR2 1\n```\n"
    (tmp_path / "docs" / "profiles" / "mpm.md").write_text(page, encoding="utf-8")
    where, body = _section(tmp_path)
    assert where == f"docs/profiles/mpm.md:{page[: page.index('### Scaling')].count(chr(10))}"
    assert body.strip() == own.strip() and "Upgrades" not in body


def test_every_block_of_the_section_is_run_by_a_test_here() -> None:
    for block in BLOCKS:
        assert block.mark in ("config", "run", "shell", "output"), f"{DOC}:{block.line}: a block no test runs"
    marks = [b.mark for b in BLOCKS]
    assert marks.count("config") == 1 and marks.count("run") == 1 and marks.count("shell") == 2
    assert marks.count("output") == 1


@pytest.mark.usefixtures("registered")
def test_the_config_block_loads_as_a_prefork_serve_config(tmp_path: Path) -> None:
    from prefork.serve import _check_serve_config

    (block,) = [b for b in BLOCKS if b.mark == "config"]
    path = tmp_path / "prefork.toml"
    path.write_text(block.code)
    config = load_config(path)
    policy = config.create("scaling")
    assert isinstance(policy, BacklogPolicy)
    assert policy == BacklogPolicy(min_servers=4, max_servers=48, max_waiting=2, step=2, idle_timeout=30.0, tick=0.5)
    assert config.mpm.backlog > policy.max_waiting  # as the page tells
    _check_serve_config(config)  # prefork serve would start with it


@pytest.mark.usefixtures("registered")
def test_the_run_block_runs() -> None:
    (block,) = [b for b in BLOCKS if b.mark == "run"]
    exec(compile(block.code, f"{DOC}:{block.line}", "exec"), {"__name__": "__doc__"})


@pytest.mark.usefixtures("registered")
def test_the_simulate_command_prints_what_the_page_shows() -> None:
    from prefork.simulate import main

    (block,) = [b for b in BLOCKS if b.mark == "shell" and "prefork simulate" in b.code]
    argv = shlex.split(block.code)
    assert argv[:2] == ["prefork", "simulate"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv[2:]) == 0
    after = _after(block)
    assert after is not None and out.getvalue() == after.code, f"{DOC}:{block.line}: the page shows other output"
    forks = re.search(r"(\d+), (\d+), (\d+) and (\d+) children forked at\s+(\d+), (\d+), (\d+) and (\d+) s",
                      " ".join(SECTION.split()))
    assert forks is not None, "the sentence about the forks after the output moved; update this test"
    trace = Trace.poisson(4, 120, Service.exponential(0.5), seed=1, bursts=[Burst(60.0, 80)])
    result = simulate(BacklogPolicy(max_servers=32), trace)
    counts, times = [int(x) for x in forks.groups()[:4]], [float(x) for x in forks.groups()[4:]]
    assert [result.fork_times.count(t) for t in times] == counts
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(result.retire_times))


@pytest.mark.skipif(shutil.which("ss") is None, reason="no ss (iproute2) here")
def test_ss_shows_the_count_as_recv_q_and_the_size_as_send_q() -> None:
    (block,) = [b for b in BLOCKS if b.mark == "shell" and b.code.startswith("ss ")]
    with listener("127.0.0.1", 50) as sock, clients(sock.getsockname(), 6):
        settles_at(sock, 6)
        argv = [a.replace(":8000", f":{sock.getsockname()[1]}") for a in shlex.split(block.code)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, check=True).stdout
        (row,) = [line.split() for line in out.splitlines() if line.startswith("LISTEN")]
        assert (int(row[1]), int(row[2])) == listen_queue(sock) == (6, min(50, SOMAXCONN))


def test_the_table_of_options_is_the_class() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", SECTION, re.MULTILINE)
    fields = {f.name: f.default for f in attrs.fields(BacklogPolicy)}
    assert [name for name, _ in rows] == list(fields)
    for name, default in rows:
        assert repr(fields[name]) == default, f"{DOC}: {name}'s default is {fields[name]!r}, the page says {default}"


@pytest.mark.usefixtures("registered")
def test_the_error_the_page_quotes_is_the_one_given() -> None:
    quoted = re.search(r"\(`(scaling\.step = 8: must be <= max_rate \(4\))`\)", SECTION)
    assert quoted is not None
    with pytest.raises(ConfigError, match=re.escape(quoted.group(1))):
        load_config(None, {"scaling": {"name": "backlog", "step": 8, "max_rate": 4}})

