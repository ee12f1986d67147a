"""The distribution as prefork sees it: its entry point, and a cheap import."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from typing import Any

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
    assert [(entry.kind, entry.name) for entry in registry if entry.plugin == "redis"] == [
        ("transport", "redis"), ("resolver", "allow"),
    ]  # fmt: skip
    assert registry.get("transport", "redis") is prefork_redis.RedisTransport
    assert registry.get("resolver", "allow") is prefork_redis.AllowResolver


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


KEY = "correct horse battery staple, 32+"


def transport_error(tmp_path: Any, text: str) -> str:
    """The one-line error for a [transport] table of the redis transport (file, key, value, reason)."""
    from prefork.config import load_config
    from prefork.errors import ConfigError

    path = tmp_path / "host.toml"
    path.write_text(f'plugins = ["prefork_redis"]\n[transport]\nname = "redis"\n{text}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("", "transport.secret = '': a host needs an HMAC key to tell its clients' tasks from anyone else's"),
        ('secret = "short"', "transport.secret = <hidden, 5 bytes>: must be at least 16 bytes"),
        (f'secret = "{KEY}"\ninsecure = true', "transport.insecure = True: contradicts the key in secret"),
        ('insecure = "yes"', "transport.insecure = 'yes': must be true or false"),
        (f'secret = "{KEY}"\nallow_any_import = 1', "transport.allow_any_import = 1: must be true or false"),
        (f'secret = "{KEY}"\ncluster = 1', "transport.cluster = 1: must be true or false"),
        (f'secret = "{KEY}"\nsocket_timeout = 0', "transport.socket_timeout = 0.0: must be more than 0"),
        (f'secret = "{KEY}"\nsocket_timeout = 301', "transport.socket_timeout = 301.0: must be more than 0 and at most 300"),
        (f'secret = "{KEY}"\nsocket_timeout = "10"', "transport.socket_timeout = '10': must be a number"),
        (f'secret = "{KEY}"\nsocket_timeout = 1\nblock_ms = 1000', "transport.block_ms = 1000: must be shorter than socket_timeout (1 s)"),
        (f'secret = "{KEY}"\ncodec = "yaml"', "transport.codec = 'yaml': must be one of prefork's serializers"),
        ('insecure = true\ncodec = "pickle"', "transport.codec = 'pickle': runs code when decoded: it needs a secret"),
        (f'secret = "{KEY}"\nstream = "a{{b}}"', "transport.stream = 'a{b}': must be a non-empty name without braces"),
        (f'secret = "{KEY}"\nallow = ["x:y"]', "transport.allow: unknown option"),
    ],
)  # fmt: skip
def test_every_transport_option_is_checked(tmp_path: Any, table: str, message: str) -> None:
    assert transport_error(tmp_path, table).startswith(message)
    assert KEY not in transport_error(tmp_path, table)  # a key is never shown


def test_the_key_may_come_from_the_environment_and_insecure_needs_none(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefork.config import load_config

    path = tmp_path / "host.toml"
    path.write_text('plugins = ["prefork_redis"]\n[transport]\nname = "redis"\n')
    monkeypatch.setenv("PREFORK_REDIS_SECRET", KEY)
    transport = load_config(path).create("transport")
    assert (transport.secret, transport.insecure, transport.allow_any_import, transport.socket_timeout) == (
        "",
        False,
        False,
        10.0,
    )
    assert "contradicts the key in $PREFORK_REDIS_SECRET" in transport_error(tmp_path, "insecure = true")
    monkeypatch.delenv("PREFORK_REDIS_SECRET")
    path.write_text('plugins = ["prefork_redis"]\n[transport]\nname = "redis"\ninsecure = true\n')
    assert load_config(path).create("transport").insecure is True


def test_the_client_checks_its_options() -> None:
    from prefork_redis import BrokerError, Client

    url = "redis://127.0.0.1:1/0"  # never connected to: these fail first
    with pytest.raises(BrokerError, match="no HMAC key: every task must be signed"):
        Client(url, "app")
    with pytest.raises(BrokerError, match="insecure=True contradicts the HMAC key"):
        Client(url, "app", secret=KEY, insecure=True)
    with pytest.raises(BrokerError, match="broker_timeout must be None or a positive number"):
        Client(url, "app", secret=KEY, broker_timeout=0)
    with pytest.raises(BrokerError, match="socket_timeout must be longer than the client's read wait"):
        Client(url, "app", secret=KEY, socket_timeout=0.5)
    with pytest.raises(BrokerError, match="task_ttl_s must be a positive integer"):
        Client(url, "app", secret=KEY, task_ttl_s=0)
