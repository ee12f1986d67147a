"""Every registered built-in strategy passes its kind's contract suite."""

from __future__ import annotations

from typing import Any

import pytest

from prefork.plugins import build_plugin_manager, build_registry
from prefork.testing import ResolverContract, ScalingContract, SerializerContract, SinkContract, TransportContract

REGISTRY = build_registry(build_plugin_manager(autoload=False))


def _all(kind: str) -> list[Any]:
    return REGISTRY.names(kind)


class TestSerializers(SerializerContract):
    @pytest.fixture(params=_all("serializer"))
    def serializer(self, request: pytest.FixtureRequest) -> Any:
        return REGISTRY.create("serializer", request.param, {})


class TestTransports(TransportContract):
    @pytest.fixture(params=_all("transport"))
    def transport(self, request: pytest.FixtureRequest) -> Any:
        return REGISTRY.create("transport", request.param, {})


RESOLVER_OPTIONS = {"xmlrpc": {"url": "http://127.0.0.1:9/RPC2"}}


class TestResolvers(ResolverContract):
    @pytest.fixture(params=_all("resolver"))
    def resolver(self, request: pytest.FixtureRequest) -> Any:
        return REGISTRY.create("resolver", request.param, RESOLVER_OPTIONS.get(request.param, {}))


class TestSinks(SinkContract):
    @pytest.fixture(params=_all("sink"))
    def sink(self, request: pytest.FixtureRequest) -> Any:
        return REGISTRY.create("sink", request.param, {})


POLICIES = [
    ("fixed", {"workers": 3}),
    ("on-demand", {"pre_fork": 1, "max_forks": 4, "spawn_delay": 2.0, "idle_timeout": 10.0}),
    ("spare", {"start_servers": 2, "min_spare": 1, "max_spare": 3, "max_servers": 6}),
]


class TestPolicies(ScalingContract):
    @pytest.fixture(params=POLICIES, ids=[p[0] for p in POLICIES])
    def policy(self, request: pytest.FixtureRequest) -> Any:
        name, options = request.param
        return REGISTRY.create("scaling", name, options)


def test_every_kind_has_builtins() -> None:
    assert set(_all("scaling")) == {"fixed", "on-demand", "spare", "backlog"}
    assert set(_all("serializer")) == {"pickle", "cloudpickle", "json"}
    assert set(_all("resolver")) == {"methods", "classes", "import", "chain", "xmlrpc"}
    assert set(_all("sink")) == {"callback", "queue", "future"}
    assert set(_all("transport")) == {"pipe"}


def test_a_strategy_lacking_what_the_core_uses_is_refused_at_registration() -> None:
    """A serializer without ``objects`` used to pass every successful task and crash the
    worker on the first task that raised (exit code 4); now registration names what is missing."""
    from prefork.errors import PluginError
    from prefork.strategies.registry import StrategyRegistry

    class ZPickle:
        name = "zpickle"

        def dumps(self, obj: Any) -> bytes:
            return b""

        def loads(self, data: bytes) -> Any:
            return None

    class Policy:
        name = "mine"

        def decide(self, stats: Any) -> Any:
            return None

    registry = StrategyRegistry()
    registry._set_plugin("myplugin")
    with pytest.raises(PluginError, match=r"serializer 'zpickle' \(plugin 'myplugin'.*\) lacks `objects`: a serializer strategy needs `objects`, `dumps`, `loads`"):
        registry.register("serializer", ZPickle)
    with pytest.raises(PluginError, match=r"scaling 'mine' .* lacks `max_workers`"):
        registry.register("scaling", Policy)
    ZPickle.objects = True  # type: ignore[attr-defined]
    registry.register("serializer", ZPickle)
    assert registry.get("serializer", "zpickle") is ZPickle


def test_the_spare_policy_with_start_servers_0_still_keeps_its_min_spare() -> None:
    """start_servers = 0 used to fork nothing, ever: the first-start branch repeated forever."""
    from prefork.strategies.scaling import PoolStats, SparePolicy

    policy = SparePolicy(start_servers=0, min_spare=2, max_spare=4, max_servers=8)
    decision = policy.decide(PoolStats(now=0.0, alive=0, booting=0, idle=0, busy=0, queued=0))
    assert decision.spawn >= 1
