"""Codecs and signatures; none of these needs a Redis server."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prefork_redis import codec
from prefork_redis.broker import Broker
from prefork_redis.codec import SECRET_ENV, Signer, codec_names, get_codec
from prefork_redis.errors import CodecError

SECRET = "correct horse battery staple, 32+"

json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=25,
)
msgpack_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text() | st.integers(0, 99), inner, max_size=5),
    max_leaves=25,
)


@pytest.fixture
def no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def offline_client() -> Any:
    """A client that is never used: constructing a broker does no I/O."""
    return redis.Redis(host="127.0.0.1", port=1)


# -- codecs ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(json_data)
def test_json_round_trip(value: Any) -> None:
    codec = get_codec("json")
    assert codec.loads(codec.dumps(value)) == value


@pytest.fixture
def installed_plugins(monkeypatch: pytest.MonkeyPatch) -> Any:
    """prefork's registry with the installed plugins loaded (prefork's own test suite
    turns their autoloading off for the whole session)."""
    pytest.importorskip("prefork_msgpack")  # the msgpack codec is that plugin's serializer
    monkeypatch.delenv("PREFORK_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    codec._registry.cache_clear()
    get_codec.cache_clear()
    yield
    codec._registry.cache_clear()
    get_codec.cache_clear()


def test_msgpack_round_trip(installed_plugins: Any) -> None:
    msgpack_codec = get_codec("msgpack")

    @settings(max_examples=150, deadline=None)
    @given(msgpack_data)
    def round_trip(value: Any) -> None:
        assert msgpack_codec.loads(msgpack_codec.dumps(value)) == value

    round_trip()


@pytest.mark.parametrize("name", ["pickle", "cloudpickle"])
def test_object_codecs_round_trip(name: str) -> None:
    codec = get_codec(name)
    value = {"t": (1, 2), "s": {1, 2}, "e": ValueError("x"), "b": b"\x00"}
    got = codec.loads(codec.dumps(value))
    assert (got["t"], got["s"], got["b"], got["e"].args) == ((1, 2), {1, 2}, b"\x00", ("x",))
    assert codec.objects is True


def test_cloudpickle_carries_a_lambda() -> None:
    codec = get_codec("cloudpickle")
    assert codec.loads(codec.dumps(lambda x: x + 1))(1) == 2


def test_plain_codecs_refuse_what_they_cannot_carry() -> None:
    assert not get_codec("json").objects
    with pytest.raises(ValueError, match="not JSON compliant"):
        get_codec("json").dumps(float("nan"))
    with pytest.raises(TypeError):
        get_codec("json").dumps(b"bytes")


def test_unknown_codec_names_the_known_ones() -> None:
    with pytest.raises(CodecError, match="unknown codec 'yaml'; the codecs are prefork's serializers: 'cloudpickle', 'json'"):
        get_codec("yaml")
    assert {"json", "pickle", "cloudpickle"} <= set(codec_names())


def test_codecs_are_preforks_serializers_with_their_network_options() -> None:
    from prefork.strategies.serializer import CloudpickleSerializer, JsonSerializer

    json_codec, cloudpickle_codec = get_codec("json"), get_codec("cloudpickle")
    assert isinstance(json_codec, JsonSerializer) and json_codec.allow_nan is False
    assert isinstance(cloudpickle_codec, CloudpickleSerializer) and cloudpickle_codec.always is True


# -- pickle needs a key ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["pickle", "cloudpickle"])
def test_a_pickle_codec_without_a_secret_is_refused(name: str, no_secret_env: None) -> None:
    with pytest.raises(CodecError) as info:
        Broker(offline_client(), "app", codec=name)
    message = str(info.value)
    assert f"codec {name!r}" in message and "secret=" in message and SECRET_ENV in message
    Broker(offline_client(), "app", codec=name, secret=SECRET)  # fine with one


def test_the_secret_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    Broker(offline_client(), "app", codec="pickle")
    assert Signer.from_secret(None) is not None


def test_a_short_secret_is_refused(no_secret_env: None) -> None:
    with pytest.raises(CodecError, match="at least 16"):
        Broker(offline_client(), "app", codec="pickle", secret="short")
    assert Signer.from_secret(None) is None and Signer.from_secret("") is None


# -- signatures -----------------------------------------------------------------------


FIELDS = (b"task-1", b"client", b"pickle", b"payload bytes")


def test_a_signature_covers_every_field_and_the_kind() -> None:
    signer = Signer(SECRET.encode())
    sig = signer.sign("task", *FIELDS)
    assert len(sig) == 64
    assert signer.verify(sig, "task", *FIELDS)
    for i in range(len(FIELDS)):
        tampered = list(FIELDS)
        tampered[i] = tampered[i] + b"!"
        assert not signer.verify(sig, "task", *tampered)
    assert not signer.verify(sig, "result", *FIELDS)
    assert not signer.verify(None, "task", *FIELDS)
    assert not signer.verify(b"", "task", *FIELDS)
    assert not Signer(b"some other key of 16+").verify(sig, "task", *FIELDS)


def test_fields_are_framed_so_boundaries_cannot_move() -> None:
    signer = Signer(SECRET.encode())
    assert signer.sign("task", b"ab", b"c") != signer.sign("task", b"a", b"bc")


def test_the_key_is_not_shown() -> None:
    assert SECRET not in repr(Signer(SECRET.encode()))
