"""The distribution as prefork sees it: its entry point, and a cheap import."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import prefork_redis
import pytest

from prefork.plugins import build_plugin_manager, build_registry


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("PREFORK_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def test_entry_point_in_the_prefork_group() -> None:
    ep = importlib.metadata.entry_points(group="prefork")["redis"]
    assert ep.value == "prefork_redis"
    assert ep.dist is not None and ep.dist.name == "prefork-redis"
    assert ep.load() is prefork_redis


def test_prefork_loads_it_and_it_registers_the_redis_transport() -> None:
    pm = build_plugin_manager(autoload=True)
    assert pm.get_plugin("redis") is prefork_redis
    registry = build_registry(pm)
    assert [(entry.kind, entry.name) for entry in registry if entry.plugin == "redis"] == [("transport", "redis")]
    assert registry.get("transport", "redis") is prefork_redis.RedisTransport


def test_a_bad_transport_option_is_a_config_error_naming_it() -> None:
    from prefork.config import load_config
    from prefork.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("transport.url = 'http://x': must be a redis://")):
        load_config(None, {"transport.name": "redis", "transport.url": "http://x"})


def test_importing_the_plugin_does_not_import_redis() -> None:
    code = "import sys, prefork_redis; assert 'redis' not in sys.modules, 'redis imported'; prefork_redis.Broker; assert 'redis' in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        prefork_redis.Nope  # noqa: B018
