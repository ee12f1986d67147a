"""The ``allow`` resolver and the gate ``serve`` puts before every remote task; no Redis needed."""

from __future__ import annotations

import operator
import sys
from pathlib import Path

import hosttasks
import pytest
from prefork_redis.allow import AllowResolver, check_pattern, remote_gate

from prefork.config import load_config
from prefork.errors import ConfigError
from prefork.strategies.resolver import ChainResolver, ClassesResolver, ImportResolver, MethodsResolver


def test_patterns_name_one_function_or_every_public_name_of_one_module() -> None:
    resolver = AllowResolver(allow=["operator:*", "math:sqrt"])
    assert resolver.resolve("operator:mul") is operator.mul
    assert resolver.resolve("math:sqrt") is not None
    for refused in ("math:floor", "os:system", "operator:__dict__", "operator:_private", "operator.os:system",
                    "operator:attrgetter.x", "operator", "", "mul"):  # fmt: skip
        assert not resolver.permits(refused), refused
        assert resolver.resolve(refused) is None, refused
    assert resolver.resolve("operator:no_such_name") is None


def test_a_name_that_is_not_allowed_imports_nothing() -> None:
    sys.modules.pop("wave", None)
    assert AllowResolver(allow=["operator:*"]).resolve("wave:open") is None
    assert remote_gate(ChainResolver(methods={"m": "operator:mul"})).permits("wave:open") is False
    assert "wave" not in sys.modules


def test_methods_and_functions_are_registered_names() -> None:
    resolver = AllowResolver(methods={"mul": "operator:mul", "touch": hosttasks.touch}, functions=[hosttasks.nap])
    assert resolver.resolve("mul") is operator.mul
    assert resolver.resolve("touch") is hosttasks.touch
    assert resolver.resolve("hosttasks:nap") is hosttasks.nap  # the name a client sends for the function
    assert resolver.resolve("hosttasks:touch") is None
    assert resolver.size() == 3


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("os", "must be 'module:function'"),
        ("*:system", "must be 'module:function'"),
        ("os.*:system", "must be 'module:function'"),
        ("os:*:*", "must be 'module:function'"),
        ("os:sys tem", "must be 'module:function'"),
        ("os:_exit", "starts with '_'"),
        ("_thread:*", "starts with '_'"),
        (7, "must be a string"),
    ],
)
def test_bad_patterns_say_why(pattern: object, problem: str) -> None:
    assert problem in check_pattern(pattern)


def test_the_gate_of_each_resolver() -> None:
    chain = remote_gate(ChainResolver(methods={"mul": "operator:mul"}, classes=["operator"]))
    assert chain.permits("mul") and chain.permits("add")  # the map, then the classes' public names
    assert not chain.permits("operator:mul") and not chain.permits("os:system")  # never the imports
    assert not chain.permits("_private")
    assert remote_gate(MethodsResolver({"mul": "operator:mul"})).permits("mul")
    assert remote_gate(ClassesResolver(["operator"])).permits("add")
    closed = remote_gate(ImportResolver())
    assert closed.size == 0 and not closed.permits("operator:mul")
    assert remote_gate(ChainResolver()).size == 0  # the profile's default: nothing registered
    opened = remote_gate(ChainResolver(), allow_any_import=True)
    assert opened.permits("os:system") and not opened.permits("os:_exit")


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "host.toml"
    path.write_text('plugins = ["prefork_redis"]\n' + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('allow = "operator:*"', "resolver.allow = 'operator:*': must be a list of patterns"),
        ('allow = ["os:_exit"]', "resolver.allow = 'os:_exit': names a part that starts with '_'"),
        ('allow = ["os.*:system"]', "resolver.allow = 'os.*:system': must be 'module:function' or 'package.module:*'"),
        ('methods = { run = "os system" }', "resolver.methods.run = 'os system': must be a 'module:function' path"),
        ('methods = { _run = "os:system" }', "resolver.methods = '_run': a method name must be a non-empty string"),
        ('functions = ["os:system"]', "resolver.functions = 'os:system': must be functions"),
        ("nope = 1", "resolver.nope: unknown option"),
    ],
)
def test_the_allow_resolvers_options_are_checked(tmp_path: Path, table: str, message: str) -> None:
    assert config_error(tmp_path, f'[resolver]\nname = "allow"\n{table}\n').startswith(message)
