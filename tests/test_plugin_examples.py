"""Two of the plugins docs/plugins.md walks through: examples/plugin_zlib_transport.py
and examples/plugin_math_resolver.py, registered as plugins and used for real.
The page's snippets, all five examples in real pools and their contract suites
are in tests/test_plugin_docs.py; the last test here checks that the page shows
each example file as it is.

The transport is driven over real socketpairs: the supervisor's end non-blocking
and polled with ``select`` against a deadline, the worker's end blocking in a
thread, exactly as a pool would hold them on either side of the fork.
"""

from __future__ import annotations

import cmath
import math
import os
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import prefork
from prefork.errors import ConfigError, PluginError
from prefork.plugins import build_plugin_manager, build_registry
from prefork.strategies.resolver import ChainResolver
from prefork.strategies.transport import PipeTransport

# `plugins = ["examples.plugin_math_resolver"]` in a prefork.toml at the project
# root imports from the project root; do the same here.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import (  # noqa: E402
    plugin_backlog_policy,
    plugin_math_resolver,
    plugin_tickets_sink,
    plugin_zlib_transport,
    plugin_zpickle_serializer,
)
from examples.plugin_math_resolver import MathResolver  # noqa: E402
from examples.plugin_zlib_transport import ZlibTransport  # noqa: E402

DEADLINE = 30.0  # seconds for any one exchange; generous for a loaded CI machine
MB = 1024 * 1024
SIZES = (0, 1, 100_000, 3 * MB)


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)


@pytest.fixture
def registry() -> prefork.StrategyRegistry:
    pm = build_plugin_manager(plugins=[plugin_zlib_transport, plugin_math_resolver], autoload=False)
    return build_registry(pm)


# -- registration ---------------------------------------------------------------------


def test_both_examples_register_under_their_module_names(registry: prefork.StrategyRegistry) -> None:
    assert registry.get("transport", "zlib") is ZlibTransport
    assert registry.get("resolver", "math") is MathResolver
    owners = {(r.kind, r.name): r.plugin for r in registry}
    assert owners[("transport", "zlib")] == "examples.plugin_zlib_transport"
    assert owners[("resolver", "math")] == "examples.plugin_math_resolver"
    # the built-ins they sit beside are untouched
    assert registry.get("transport", "pipe") is PipeTransport
    assert {"methods", "classes", "import", "chain"} <= set(registry.names("resolver"))


def test_listed_by_module_name_as_in_prefork_toml() -> None:
    pm = build_plugin_manager(
        plugins=["examples.plugin_zlib_transport", "examples.plugin_math_resolver"], autoload=False
    )
    registry = build_registry(pm)
    assert registry.get("transport", "zlib") is ZlibTransport
    assert registry.get("resolver", "math") is MathResolver


def test_blocked_by_prefork_disable_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFORK_DISABLE_PLUGINS", "examples.plugin_math_resolver")
    pm = build_plugin_manager(plugins=[plugin_zlib_transport, plugin_math_resolver], autoload=False)
    registry = build_registry(pm)
    assert "math" not in registry.names("resolver")
    assert "zlib" in registry.names("transport")


def test_listing_the_same_plugin_module_twice_registers_it_once() -> None:
    pm = build_plugin_manager(plugins=[plugin_math_resolver, plugin_math_resolver], autoload=False)
    assert sum(1 for _, p in pm.list_name_plugin() if p is plugin_math_resolver) == 1
    assert build_registry(pm).names("resolver").count("math") == 1


def test_two_plugins_registering_one_strategy_name_is_an_error() -> None:
    class Twin:
        @prefork.hookimpl
        def prefork_register_strategies(self, registry: prefork.StrategyRegistry) -> None:
            registry.register("resolver", plugin_math_resolver.MathResolver)

    pm = build_plugin_manager(plugins=[plugin_math_resolver, Twin()], autoload=False)
    with pytest.raises(PluginError, match="resolver strategy 'math' is registered twice"):
        build_registry(pm)


def test_the_classes_follow_their_protocols(registry: prefork.StrategyRegistry) -> None:
    transport = registry.create("transport", "zlib", {"level": 1}, "prefork.toml: transport")
    assert isinstance(transport, prefork.Transport)
    assert transport == ZlibTransport(level=1)
    resolver = registry.create("resolver", "math", {}, "prefork.toml: resolver")
    assert isinstance(resolver, prefork.MethodResolver)


def test_options_are_checked_with_the_config_location(registry: prefork.StrategyRegistry) -> None:
    with pytest.raises(ConfigError, match=r"^prefork.toml: transport.level = 12: must be an integer from -1"):
        registry.create("transport", "zlib", {"level": 12}, "prefork.toml: transport")
    with pytest.raises(ConfigError, match=r"^prefork.toml: transport.levle: unknown option; did you mean 'level'\?"):
        registry.create("transport", "zlib", {"levle": 1}, "prefork.toml: transport")
    # the pipe's own options are inherited, with their validators
    with pytest.raises(ConfigError, match=r"^prefork.toml: transport.read_size = 0: must be >= 1$"):
        registry.create("transport", "zlib", {"read_size": 0}, "prefork.toml: transport")
    with pytest.raises(ConfigError, match=r"^prefork.toml: resolver.module = 'no_such_module_x': cannot be imported"):
        registry.create("resolver", "math", {"module": "no_such_module_x"}, "prefork.toml: resolver")


# -- the resolver ---------------------------------------------------------------------


def test_math_names_resolve_to_math_functions() -> None:
    resolver = MathResolver()
    assert resolver.resolve("math.sqrt") is math.sqrt
    assert resolver.resolve("math.hypot")(3, 4) == 5.0  # type: ignore[misc]
    assert resolver.resolve("math.isclose") is math.isclose


@pytest.mark.parametrize(
    "method",
    [
        "sqrt",
        "os.system",
        "mathsqrt",
        "math.",
        "math.pi",
        "math.no_such_function",
        "math.__loader__",
        "math._x",
        "math.sqrt.x",
    ],
)
def test_other_names_are_not_the_resolvers(method: str) -> None:
    assert MathResolver().resolve(method) is None


def test_prefix_and_module_options() -> None:
    assert MathResolver(prefix="c.", module="cmath").resolve("c.sqrt") is cmath.sqrt
    assert MathResolver(prefix="c.", module="cmath").resolve("math.sqrt") is None
    assert MathResolver(prefix="").resolve("floor") is math.floor


def test_chains_after_the_built_in_resolvers() -> None:
    chain = ChainResolver(methods={"double": lambda x: 2 * x}, imports=True, extra=[MathResolver()])
    assert chain.resolve("math.factorial") is math.factorial
    assert chain.resolve("double")(4) == 8  # type: ignore[misc]
    assert chain.resolve("os:getpid") is os.getpid
    assert chain.resolve("nothing") is None


# -- the transport: helpers -------------------------------------------------------------


def payload(size: int, compressible: bool, seed: int = 0) -> bytes:
    if compressible:
        text = b"prefork frames compress well when they repeat themselves. "
        return (text * (size // len(text) + 1))[:size]
    return random.Random(seed + size).randbytes(size)


def frames_for(sizes: Sequence[int]) -> list[bytes]:
    """Each size twice: incompressible (sent raw) and compressible (sent as zlib)."""
    return [payload(n, c, seed=i) for i, n in enumerate(sizes) for c in (False, True)]


class Background:
    """Run ``fn`` in a thread; ``join`` returns its result or re-raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:
            self._error = exc

    def join(self, timeout: float = DEADLINE) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the worker-side thread did not finish in time"
        if self._error is not None:
            raise self._error
        return self._result


def pump(parent: Any, want: int, deadline: float) -> list[bytes]:
    """Poll the supervisor's non-blocking end until ``want`` frames arrived."""
    frames: list[bytes] = []
    while len(frames) < want:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out with {len(frames)} of {want} frames"
        readable, writable, _ = select.select([parent], [parent] if parent.wants_write() else [], [], left)
        if writable:
            parent.flush()
        if readable:
            frames.extend(bytes(f) for f in parent.read())  # valid until the next read only: keep copies
    return frames


def drain_writes(parent: Any, deadline: float) -> None:
    while parent.wants_write():
        left = deadline - time.monotonic()
        assert left > 0, "timed out flushing the supervisor's end"
        _, writable, _ = select.select([], [parent], [], left)
        if writable:
            parent.flush()


def read_to_eof(parent: Any, deadline: float) -> list[bytes]:
    """Every frame up to the end of stream, which must come as EOFError."""
    frames: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "timed out waiting for EOFError"
        readable, _, _ = select.select([parent], [], [], left)
        if readable:
            try:
                frames.extend(parent.read())
            except EOFError:
                return frames


def recv_all(sock: socket.socket) -> bytes:
    sock.settimeout(DEADLINE)
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def chunks(data: bytes, rng: random.Random, largest: int) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        n = rng.randint(1, largest)
        yield data[pos : pos + n]
        pos += n


@pytest.fixture
def pair() -> Iterator[Callable[[ZlibTransport], tuple[Any, Any]]]:
    """Make a (parent channel, child channel) pair, closed at the end of the test."""
    made: list[Any] = []

    def make(transport: ZlibTransport) -> tuple[Any, Any]:
        a, b = transport.socketpair()
        parent, child = transport.parent_channel(a), transport.child_channel(b)
        made.extend((parent, child))
        return parent, child

    yield make
    for channel in made:
        channel.close()  # closing twice is harmless for sockets


# -- the transport: both ways over real sockets -------------------------------------------


@pytest.mark.parametrize(
    "transport",
    [ZlibTransport(), ZlibTransport(level=1, min_size=0), ZlibTransport(level=0, buffer_size=65536)],
    ids=repr,
)
def test_frames_of_every_size_cross_both_ways(pair: Any, transport: ZlibTransport) -> None:
    parent, child = pair(transport)
    frames = frames_for(SIZES)

    def echo() -> int:
        n = 0
        while (frame := child.recv()) is not None:
            child.send(frame)
            n += 1
        child.close()
        return n

    worker = Background(echo)
    deadline = time.monotonic() + DEADLINE
    for frame in frames:
        parent.send(frame)  # never blocks: what the socket does not take is queued
    echoed = pump(parent, len(frames), deadline)
    assert [len(f) for f in echoed] == [len(f) for f in frames]
    assert echoed == frames
    parent.close()
    assert worker.join() == len(frames)


def test_small_reads_split_every_frame(pair: Any) -> None:
    # read_size 7: each end asks its socket for 7 bytes at a time, so headers and
    # bodies arrive in pieces on both sides.
    parent, child = pair(ZlibTransport(read_size=7, min_size=0))
    frames = frames_for((0, 1, 2, 7, 8, 9, 100, 5000))

    def echo() -> None:
        for _ in frames:
            frame = child.recv()
            assert frame is not None
            child.send(frame)

    worker = Background(echo)
    deadline = time.monotonic() + DEADLINE
    for frame in frames:
        parent.send(frame)
    assert pump(parent, len(frames), deadline) == frames
    worker.join()


def test_the_worker_sends_then_closes_and_the_supervisor_sees_every_frame_then_eof(pair: Any) -> None:
    parent, child = pair(ZlibTransport())
    frames = frames_for(SIZES)

    def talk() -> None:
        for frame in frames:
            child.send(frame)
        child.close()

    worker = Background(talk)
    got = read_to_eof(parent, time.monotonic() + DEADLINE)
    worker.join()
    assert got == frames
    with pytest.raises(EOFError):
        parent.read()


def test_the_supervisor_closes_and_the_worker_sees_none(pair: Any) -> None:
    parent, child = pair(ZlibTransport())
    frames = frames_for(SIZES)

    def listen() -> list[bytes]:
        got = []
        while (frame := child.recv()) is not None:
            got.append(frame)
        return got

    worker = Background(listen)
    for frame in frames:
        parent.send(frame)
    drain_writes(parent, time.monotonic() + DEADLINE)
    parent.close()
    assert worker.join() == frames


# -- the transport: frames split at arbitrary points ----------------------------------------


def wire_from_child(transport: ZlibTransport, frames: Sequence[bytes]) -> bytes:
    """The exact bytes a worker's channel puts on the socket for ``frames``."""
    tap, b = socket.socketpair()
    child = transport.child_channel(b)

    def talk() -> None:
        for frame in frames:
            child.send(frame)
        child.close()

    worker = Background(talk)
    try:
        wire = recv_all(tap)
    finally:
        tap.close()
    worker.join()
    return wire


def wire_from_parent(transport: ZlibTransport, frames: Sequence[bytes]) -> bytes:
    """The exact bytes the supervisor's channel puts on the socket for ``frames``."""
    a, tap = socket.socketpair()
    parent = transport.parent_channel(a)
    reader = Background(lambda: recv_all(tap))
    for frame in frames:
        parent.send(frame)
    drain_writes(parent, time.monotonic() + DEADLINE)
    parent.close()
    try:
        return reader.join()  # type: ignore[no-any-return]
    finally:
        tap.close()


def test_compressible_frames_shrink_on_the_wire_and_random_ones_do_not_grow_much() -> None:
    transport = ZlibTransport()
    text, noise = payload(3 * MB, True), payload(3 * MB, False)
    assert len(wire_from_child(transport, [text])) < len(text) // 20
    assert len(wire_from_child(transport, [noise])) <= len(noise) + 8 + 1  # pipe header + flag byte


def test_supervisor_reassembles_frames_fed_one_byte_at_a_time() -> None:
    transport = ZlibTransport(min_size=0)
    frames = frames_for((0, 1, 2, 300))
    wire = wire_from_child(transport, frames)
    feed, b = socket.socketpair()
    parent = transport.parent_channel(b)
    got: list[bytes] = []
    reads_between_frames = 0
    try:
        for i in range(len(wire)):
            feed.sendall(wire[i : i + 1])
            readable, _, _ = select.select([parent], [], [], DEADLINE)
            assert readable
            new = parent.read()
            reads_between_frames += not new
            got.extend(new)
            assert got == frames[: len(got)]  # whole frames only, in order
        assert got == frames
        assert reads_between_frames > len(frames)  # most reads found only part of a frame
        feed.close()
        with pytest.raises(EOFError):
            parent.read()
    finally:
        feed.close()
        parent.close()


def test_supervisor_reassembles_large_frames_fed_in_random_pieces() -> None:
    transport = ZlibTransport()
    frames = frames_for(SIZES)
    wire = wire_from_child(transport, frames)
    feed, b = socket.socketpair()
    parent = transport.parent_channel(b)
    rng = random.Random(7)

    def trickle() -> None:
        for piece in chunks(wire, rng, 70_000):
            feed.sendall(piece)
        feed.close()

    writer = Background(trickle)
    try:
        got = read_to_eof(parent, time.monotonic() + DEADLINE)
        writer.join()
        assert got == frames
    finally:
        parent.close()


@pytest.mark.parametrize("largest", [1, 13, 70_000])
def test_worker_reassembles_frames_fed_in_pieces(largest: int) -> None:
    transport = ZlibTransport(min_size=0)
    frames = frames_for(SIZES if largest > 1000 else (0, 1, 2, 300, 20_000))
    wire = wire_from_parent(transport, frames)
    feed, b = socket.socketpair()
    child = transport.child_channel(b)
    rng = random.Random(largest)

    def trickle() -> None:
        for n, piece in enumerate(chunks(wire, rng, largest)):
            feed.sendall(piece)
            if n % 50 == 0:
                time.sleep(0.0005)  # let the worker's recv see a partial frame
        feed.close()

    writer = Background(trickle)
    try:
        assert [child.recv() for _ in frames] == frames
        assert child.recv() is None
        writer.join()
    finally:
        child.close()


def test_a_frame_from_a_plain_pipe_peer_is_refused_by_name() -> None:
    # A worker on the "pipe" transport talking to a supervisor on "zlib": the
    # first byte of b"hello" is no flag byte.
    wire = wire_from_child(PipeTransport(), [b"hello"])  # type: ignore[arg-type]
    feed, b = socket.socketpair()
    parent = ZlibTransport().parent_channel(b)
    try:
        feed.sendall(wire)
        select.select([parent], [], [], DEADLINE)
        with pytest.raises(ValueError, match=r"unknown flag byte b'h' \(is the peer using the zlib transport\?\)"):
            parent.read()
    finally:
        feed.close()
        parent.close()


# -- the tutorial shows these files as they are ---------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        plugin_backlog_policy,
        plugin_zlib_transport,
        plugin_zpickle_serializer,
        plugin_math_resolver,
        plugin_tickets_sink,
    ],
    ids=lambda m: m.__name__,
)
def test_docs_show_the_example_files_whole(module: Any) -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    source = Path(module.__file__).read_text(encoding="utf-8").rstrip("\n")
    assert f"```python\n{source}\n```" in docs, f"docs/plugins.md no longer shows {module.__name__} as it is"
