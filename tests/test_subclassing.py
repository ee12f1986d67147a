"""Strategies subclassed in an application: given as objects or classes in code,
or named by import path in a prefork.toml, for all five kinds.

Before, an object or a class where a strategy goes was refused ("must be a
table or a strategy name"), and only a plugin with an ``@hookimpl`` worked.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest

import prefork
from prefork._supervisor import Supervisor
from prefork.config import load_config
from prefork.errors import ConfigError
from prefork.strategies.resolver import ChainResolver
from prefork.strategies.scaling import Decision, FixedPolicy, PoolStats
from prefork.strategies.serializer import PickleSerializer
from prefork.strategies.sink import QueueSink
from prefork.strategies.transport import PipeTransport

DECISIONS: list[int] = []


@attrs.frozen
class CountingPolicy(FixedPolicy):
    """A fixed policy that notes each decision (in the process that asks: the supervisor)."""

    def decide(self, stats: PoolStats) -> Decision:
        DECISIONS.append(stats.alive)
        return super().decide(stats)


@attrs.frozen
class TaggingSerializer(PickleSerializer):
    """Pickle, but a str result comes back tagged: proof that this serializer ran both ways."""

    def loads(self, data: bytes) -> Any:
        value = super().loads(data)
        return value + " (tagged)" if isinstance(value, str) else value


@attrs.frozen
class ShoutingResolver(ChainResolver):
    def resolve(self, method: str) -> Any:
        if method == "shout":
            return str.upper
        return super().resolve(method)


@attrs.frozen
class SmallReads(PipeTransport):
    """The pipe transport reading 512 bytes at a time: frames still arrive whole."""

    read_size: int = 512


def test_objects_in_code_for_the_executor() -> None:
    DECISIONS.clear()
    with prefork.Executor(
        scaling=CountingPolicy(workers=2), serializer=TaggingSerializer(), resolver=ShoutingResolver(),
        transport=SmallReads(),
    ) as ex:
        assert ex.submit("shout", "hi").result(timeout=10) == "HI (tagged)"  # type: ignore[arg-type]
        assert ex.submit(len, "x" * 5000).result(timeout=10) == 5000
        assert sorted(ex.submit(os.getpid).result(timeout=10) for _ in range(4))
        assert isinstance(ex._sup.transport, SmallReads) and ex._sup.max_workers == 2
    assert DECISIONS, "the policy object was not the one asked"


def test_classes_in_code_and_the_boss_worker() -> None:
    with prefork.BossWorker(work_handler=str.upper, serializer=TaggingSerializer, scaling=CountingPolicy(workers=1)) as bw:
        bw.add_work("job")
        assert bw.get_result(timeout=10) == "JOB (tagged)"


def test_a_sink_object_for_the_core_supervisor() -> None:
    sink = QueueSink()
    sup = Supervisor(load_config(None, {"sink": sink, "scaling.workers": 1}))
    sup.start()
    try:
        assert sup.sink is sink
        sup.submit(abs, (-3,))
        outcome = sink.get(timeout=10)
        assert outcome is not None and outcome.ok and outcome.value == 3
    finally:
        sup.shutdown()


STRATEGIES = textwrap.dedent('''
    import attrs
    from prefork.strategies.scaling import FixedPolicy
    from prefork.strategies.serializer import PickleSerializer
    from prefork.strategies.resolver import ChainResolver
    from prefork.strategies.transport import PipeTransport
    from prefork.strategies.sink import FutureSink

    @attrs.frozen
    class Policy(FixedPolicy):
        pass

    @attrs.frozen
    class Serializer(PickleSerializer):
        def loads(self, data):
            value = super().loads(data)
            return value + "!" if isinstance(value, str) else value

    @attrs.frozen
    class Resolver(ChainResolver):
        def resolve(self, method):
            return str.title if method == "title" else super().resolve(method)

    @attrs.frozen
    class Transport(PipeTransport):
        read_size: int = 1024

    @attrs.define
    class Sink(FutureSink):
        pass
''')


def test_all_five_kinds_by_import_path_in_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mystrategies.py").write_text(STRATEGIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    toml = tmp_path / "prefork.toml"
    toml.write_text(textwrap.dedent('''
        [scaling]
        name = "mystrategies:Policy"
        workers = 2
        [serializer]
        name = "mystrategies:Serializer"
        [resolver]
        name = "mystrategies:Resolver"
        [transport]
        name = "mystrategies:Transport"
        read_size = 2048
        [sink]
        name = "mystrategies:Sink"
    '''))
    config = load_config(toml)
    assert [config.spec(k).name.split(":")[1] for k in ("scaling", "serializer", "resolver", "transport", "sink")] == [
        "Policy", "Serializer", "Resolver", "Transport", "Sink"]
    assert config.create("transport").read_size == 2048  # options still go through the class's fields
    sup = Supervisor(config)
    sup.start()
    try:
        assert sup.submit("title", ("a b",)).result(10) == "A B!"
    finally:
        sup.shutdown()


def test_bad_import_paths_and_options_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scaling.name = 'nosuch.module:Policy': cannot import it"):
        load_config(None, {"scaling.name": "nosuch.module:Policy"})
    with pytest.raises(ConfigError, match=r"serializer.name = 'json:dumps': is a function, not a class"):
        load_config(None, {"serializer.name": "json:dumps"})
    with pytest.raises(ConfigError, match=r"lacks `objects`"):
        load_config(None, {"serializer.name": "collections:OrderedDict"})
    with pytest.raises(ConfigError, match=r"a scaling given as an object takes no options"):
        load_config(None, {"scaling": CountingPolicy(workers=1), "scaling.workers": 3})
    with pytest.raises(TypeError, match="max_workers or scaling"):
        prefork.Executor(2, scaling=CountingPolicy(workers=1))
    toml = tmp_path / "prefork.toml"
    toml.write_text('scaling = 3\n')
    with pytest.raises(ConfigError, match=r"scaling = 3: must be a table or a strategy name"):
        load_config(toml)


class ClosingSink(QueueSink):
    """Records the order of deliveries and the close."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        self.events.append("deliver")
        super().deliver(task, ok, value)

    def close(self) -> None:
        self.events.append("close")
        raise RuntimeError("a sink whose close fails does not stop the pool from stopping")


def test_a_sinks_close_is_called_once_after_the_last_delivery() -> None:
    sink = ClosingSink()
    sup = Supervisor(load_config(None, {"sink": sink, "scaling.workers": 1}))
    sup.start()
    for i in range(3):
        sup.submit(abs, (-i,))
    sup.shutdown(wait=True)
    assert sup.stopped
    assert sink.events == ["deliver"] * 3 + ["close"]
