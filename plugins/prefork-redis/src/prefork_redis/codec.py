"""Codecs turn task arguments and results into bytes; a :class:`Signer` vouches for them.

Two kinds of codec:

* **plain data**, ``json`` and ``msgpack``: decoding runs no code, so a
  message needs no signature to be decoded safely.
* **objects**, ``pickle`` and ``cloudpickle``: decoding a pickle can run any
  code its author chose.  Anyone who can write to the Redis server could put
  such a message in the task stream, so these codecs are only allowed with an
  HMAC key, every message is signed, and a message whose signature does not
  verify is never decoded.

A signature is HMAC-SHA256 over a length-prefixed frame: a protocol tag, the
message kind (``task`` or ``result``, so a result cannot be replayed as a
task) and the fields the kind names (the task id, the payload and the fields
that route or qualify it); see :meth:`Signer.sign`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
from typing import Any, ClassVar, Final, Protocol, final

from prefork_redis.errors import CodecError

__all__ = [
    "CODECS",
    "SECRET_ENV",
    "CloudpickleCodec",
    "Codec",
    "JsonCodec",
    "MsgpackCodec",
    "PickleCodec",
    "Signer",
    "get_codec",
    "require_signer",
]

#: The environment variable read when no ``secret`` is passed.
SECRET_ENV: Final = "PREFORK_REDIS_SECRET"
#: An HMAC key shorter than this is refused as a likely mistake.
MIN_SECRET_BYTES: Final = 16
_FRAME_TAG: Final = b"prefork-redis/1"


class Codec(Protocol):
    """Turns values into bytes and back."""

    #: The word written in the ``codec`` field of every message.
    name: ClassVar[str]
    #: True when :meth:`loads` can run code (pickle): such messages must be signed.
    objects: ClassVar[bool]

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


@final
class JsonCodec:
    """Standard JSON (no NaN or infinity), UTF-8; tuples come back as lists, bytes are refused."""

    __slots__ = ()
    name: ClassVar[str] = "json"
    objects: ClassVar[bool] = False

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


@final
class MsgpackCodec:
    """msgpack (the optional dependency ``prefork-redis[msgpack]``): bytes stay bytes, tuples become lists."""

    __slots__ = ("_msgpack",)
    name: ClassVar[str] = "msgpack"
    objects: ClassVar[bool] = False

    def __init__(self) -> None:
        try:
            import msgpack  # type: ignore[import-untyped]
        except ImportError as exc:
            raise CodecError("codec 'msgpack' needs the msgpack package: pip install 'prefork-redis[msgpack]'") from exc
        self._msgpack: Any = msgpack

    def dumps(self, obj: Any) -> bytes:
        data: bytes = self._msgpack.packb(obj, use_bin_type=True)
        return data

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False, strict_map_key=False)


@final
class PickleCodec:
    """pickle at its highest protocol; only with an HMAC key."""

    __slots__ = ()
    name: ClassVar[str] = "pickle"
    objects: ClassVar[bool] = True

    def dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


@final
class CloudpickleCodec:
    """cloudpickle (lambdas, closures, ``__main__`` functions by value); read back with pickle; only with an HMAC key."""

    __slots__ = ()
    name: ClassVar[str] = "cloudpickle"
    objects: ClassVar[bool] = True

    def dumps(self, obj: Any) -> bytes:
        import cloudpickle  # type: ignore[import-untyped]

        data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return data

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


#: Every codec by name.
CODECS: Final[dict[str, type[Codec]]] = {c.name: c for c in (JsonCodec, MsgpackCodec, PickleCodec, CloudpickleCodec)}


def get_codec(name: str) -> Codec:
    """The codec called ``name``; :class:`CodecError` names the known ones on a miss."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; the codecs are {', '.join(map(repr, CODECS))}") from None
    return cls()


@final
class Signer:
    """HMAC-SHA256 signatures with one key; compare with :func:`hmac.compare_digest`."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_SECRET_BYTES:
            raise CodecError(
                f"the HMAC secret is {len(key)} bytes long; use at least {MIN_SECRET_BYTES} random bytes "
                "(for example: python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        self._key = key

    def __repr__(self) -> str:
        return "Signer(<key hidden>)"

    @classmethod
    def from_secret(cls, secret: str | bytes | None) -> Signer | None:
        """A signer for ``secret``, else for ``$PREFORK_REDIS_SECRET``; None when neither is set."""
        if secret is None:
            secret = os.environ.get(SECRET_ENV) or None
        if secret is None or secret in ("", b""):
            return None
        return cls(secret.encode() if isinstance(secret, str) else bytes(secret))

    def sign(self, kind: str, *fields: bytes) -> bytes:
        """The hex signature of a ``kind`` message made of ``fields``.

        The frame is ``tag, kind, fields...``, each prefixed with its length
        (8 bytes, big-endian), so no two field lists share a frame.  The broker
        signs a task over ``(task id, reply_to, codec, payload)`` and a result
        over ``(task id, status, codec, payload)``.
        """
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (_FRAME_TAG, kind.encode(), *fields):
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.hexdigest().encode()

    def verify(self, signature: bytes | None, kind: str, *fields: bytes) -> bool:
        """Whether ``signature`` is this key's signature of the message (constant time)."""
        if not signature:
            return False
        return hmac.compare_digest(signature, self.sign(kind, *fields))


def require_signer(codec: Codec, signer: Signer | None) -> None:
    """Refuse an object codec without an HMAC key, saying why and how to give one."""
    if codec.objects and signer is None:
        raise CodecError(
            f"codec {codec.name!r} can run code hidden in the messages it decodes, so prefork-redis "
            f"only uses it with an HMAC key that signs every message: pass secret=... or set "
            f"{SECRET_ENV}; or choose a plain-data codec ('json', 'msgpack')"
        )
