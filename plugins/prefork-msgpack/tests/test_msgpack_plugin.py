"""prefork-msgpack, tested as installed: entry point, registration, round trips, errors.

These tests import the installed distribution, never the source tree: they
skip (with a reason) only when ``prefork-msgpack`` is not installed.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

prefork_msgpack = pytest.importorskip(
    "prefork_msgpack", reason="prefork-msgpack is not installed (pip install ./plugins/prefork-msgpack)"
)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import prefork  # noqa: E402
from prefork.errors import ConfigError  # noqa: E402
from prefork.plugins import build_plugin_manager, build_registry  # noqa: E402

MsgpackSerializer = prefork_msgpack.MsgpackSerializer
WHERE = "prefork.toml: serializer"


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("PREFORK_DISABLE_PLUGIN_AUTOLOAD", raising=False)


@pytest.fixture
def registry() -> prefork.StrategyRegistry:
    return build_registry(build_plugin_manager(autoload=True))


# -- discovery --------------------------------------------------------------------


def test_entry_point_in_the_prefork_group() -> None:
    eps = importlib.metadata.entry_points(group="prefork")
    ep = eps["msgpack"]
    assert ep.value == "prefork_msgpack"
    assert ep.dist is not None and ep.dist.name == "prefork-msgpack"
    assert ep.load() is prefork_msgpack


def test_autoload_registers_the_serializer_owned_by_the_plugin(registry: prefork.StrategyRegistry) -> None:
    assert "msgpack" in registry.names("serializer")
    assert registry.get("serializer", "msgpack") is MsgpackSerializer
    (entry,) = [r for r in registry if r.kind == "serializer" and r.name == "msgpack"]
    assert entry.plugin == "msgpack"  # the entry point's name
    # the built-ins are still there, and nothing else was taken over
    assert {"pickle", "cloudpickle", "json"} <= set(registry.names("serializer"))


def test_the_plugin_manager_holds_the_module_under_the_entry_point_name() -> None:
    pm = build_plugin_manager(autoload=True)
    assert pm.get_plugin("msgpack") is prefork_msgpack


def test_without_autoload_the_plugin_is_absent() -> None:
    registry = build_registry(build_plugin_manager(autoload=False))
    assert "msgpack" not in registry.names("serializer")


def test_autoload_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFORK_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "msgpack" not in build_registry(build_plugin_manager()).names("serializer")


def test_blocked_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFORK_DISABLE_PLUGINS", "something-else, msgpack")
    pm = build_plugin_manager(autoload=True)
    assert pm.get_plugin("msgpack") is None
    assert "msgpack" not in build_registry(pm).names("serializer")


def test_listed_by_module_name_without_autoload() -> None:
    registry = build_registry(build_plugin_manager(plugins=["prefork_msgpack"], autoload=False))
    assert registry.get("serializer", "msgpack") is MsgpackSerializer


def test_follows_the_serializer_protocol(registry: prefork.StrategyRegistry) -> None:
    serializer = registry.create("serializer", "msgpack", {}, WHERE)
    assert isinstance(serializer, prefork.Serializer)
    assert serializer == MsgpackSerializer()
    assert MsgpackSerializer.name == "msgpack"
    assert MsgpackSerializer.objects is False


# -- round trips --------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=25,
)


def normalise(value: Any) -> Any:
    """What msgpack gives back: tuples become lists, all the way down."""
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


def same(a: Any, b: Any) -> bool:
    """Equality that also tells True from 1 and 1.0 from 1, and bytes from str."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=300, database=None)
@given(values)
def test_round_trip(value: Any) -> None:
    serializer = MsgpackSerializer()
    data = serializer.dumps(value)
    assert isinstance(data, bytes)
    assert same(serializer.loads(data), normalise(value))


@settings(max_examples=100, database=None)
@given(values)
def test_round_trip_with_strict_map_keys(value: Any) -> None:
    serializer = MsgpackSerializer(strict_map_key=True)
    assert same(serializer.loads(serializer.dumps(value)), normalise(value))


def test_tuples_come_back_as_lists_and_bytes_as_bytes() -> None:
    serializer = MsgpackSerializer()
    out = serializer.loads(serializer.dumps({"args": (1, (2, b"\x00\xff")), "kw": {}}))
    assert out == {"args": [1, [2, b"\x00\xff"]], "kw": {}}
    assert type(out["args"][1][1]) is bytes


def test_int_bounds() -> None:
    serializer = MsgpackSerializer()
    for n in (-(2**63), 2**63 - 1, 2**64 - 1):
        assert serializer.loads(serializer.dumps(n)) == n


def test_non_str_keys_need_strict_map_key_off() -> None:
    data = MsgpackSerializer().dumps({1: "one"})
    assert MsgpackSerializer().loads(data) == {1: "one"}
    with pytest.raises(ValueError):
        MsgpackSerializer(strict_map_key=True).loads(data)


# -- errors -------------------------------------------------------------------------


class Custom:
    pass


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "'object'"),
        ({1, 2}, "'set'"),
        (Custom(), f"'{__name__}.Custom'"),
        ([1, {"x": ValueError("e")}], "'ValueError'"),
    ],
)
def test_unserialisable_value_is_a_type_error_naming_the_type(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError, match=f"msgpack serializer cannot encode an object of type {type_name}"):
        MsgpackSerializer().dumps(value)


def test_int_too_large_is_an_overflow_error() -> None:
    with pytest.raises(OverflowError, match=r"cannot encode the integer 18446744073709551616: msgpack integers range"):
        MsgpackSerializer().dumps(2**64)
    with pytest.raises(OverflowError, match="cannot encode the integer"):
        MsgpackSerializer().dumps([-(2**63) - 1])


def test_unknown_option_is_a_config_error_with_did_you_mean(registry: prefork.StrategyRegistry) -> None:
    with pytest.raises(ConfigError) as info:
        registry.create("serializer", "msgpack", {"use_bin_typ": True}, WHERE)
    assert str(info.value) == (
        "prefork.toml: serializer.use_bin_typ: unknown option; did you mean 'use_bin_type'? "
        "(options of 'msgpack': use_bin_type, strict_map_key)"
    )


def test_bad_option_value_is_a_config_error(registry: prefork.StrategyRegistry) -> None:
    with pytest.raises(ConfigError, match=r"^prefork.toml: serializer.strict_map_key = 'yes': must be true or false$"):
        registry.create("serializer", "msgpack", {"strict_map_key": "yes"}, WHERE)


def test_misspelt_name_suggests_msgpack(registry: prefork.StrategyRegistry) -> None:
    with pytest.raises(ConfigError, match=r"unknown serializer strategy 'msgpak'; did you mean 'msgpack'\?"):
        registry.create("serializer", "msgpak", {}, WHERE)
