"""Optional members of the strategy protocols (``prefork.strategies.optional``):
their defaults apply when left out, and a wrong type fails at load, naming the member."""

from __future__ import annotations

import pickle
from typing import Any, ClassVar

import pytest

import prefork
from prefork.errors import PluginError
from prefork.strategies import optional
from prefork.strategies.registry import StrategyRegistry


class BareSerializer:
    """Only what the protocol requires: no takes_buffers, no dumps_parts."""

    name: ClassVar[str] = "bare"
    objects: ClassVar[bool] = True

    def dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj)

    def loads(self, data: bytes) -> Any:
        assert type(data) is bytes, f"got {type(data).__name__}: takes_buffers defaults to False"
        return pickle.loads(data)


def double(x: int) -> int:
    return 2 * x


def test_a_serializer_with_only_the_required_members_gets_bytes_and_works() -> None:
    assert not optional.takes_buffers(BareSerializer()) and optional.dumps_parts(BareSerializer()) is None
    with prefork.Executor(1, serializer=BareSerializer()) as ex:
        assert list(ex.map(double, range(50))) == [2 * i for i in range(50)]
        assert isinstance(ex.submit(int, "x").exception(10), ValueError)


@pytest.mark.parametrize(
    ("kind", "member", "value", "words"),
    [
        ("serializer", "takes_buffers", "yes", "a bool"),
        ("serializer", "dumps_parts", True, "a method"),
        ("transport", "max_frame", -1, "an int >= 0"),
        ("transport", "max_frame", 1.5, "an int >= 0"),
        ("sink", "cancel_running", 1, "a bool"),
        ("sink", "close", "no", "a method"),
        ("scaling", "resized", 3, "a method"),
    ],
)
def test_a_wrong_optional_member_is_refused_at_registration_naming_it(kind: str, member: str, value: Any, words: str) -> None:
    cls = type("Odd", (), {"name": "odd", member: value})
    with pytest.raises(PluginError, match=f"`{member}` must be {words}"):
        optional.check(kind, cls, "'odd'")


def test_registration_runs_the_check() -> None:
    reg = StrategyRegistry()

    class Odd(BareSerializer):
        name: ClassVar[str] = "odd"
        takes_buffers = "sometimes"

    with pytest.raises(PluginError, match=r"serializer 'odd'.*`takes_buffers` must be a bool"):
        reg.register("serializer", Odd)


def test_an_instance_given_in_code_is_checked_when_the_pool_is_made() -> None:
    s = BareSerializer()
    s.takes_buffers = 1  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="`takes_buffers` must be a bool"):
        prefork.Executor(1, serializer=s)


def test_attrs_fields_are_checked_on_the_instance_not_the_class() -> None:
    from prefork.strategies.sink import FutureSink

    optional.check("sink", FutureSink, "'future'")  # a slot descriptor on the class: fine
    assert optional.cancels_running(FutureSink(cancel_running=True))
    assert not optional.cancels_running(FutureSink())


def test_defaults() -> None:
    bare = object()
    assert optional.max_frame(bare) == 0
    assert optional.sink_close(bare) is None
    assert optional.resized(bare) is None and optional.evolve(bare) is None
    assert optional.send_parts(bare) is None
