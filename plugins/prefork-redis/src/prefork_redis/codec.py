"""Codecs turn task arguments and results into bytes; a :class:`Signer` vouches for them.

A codec is one of prefork's serializer strategies, found by name in prefork's
registry (built-ins and installed plugins), with the options messages that
cross hosts need (:data:`NETWORK_OPTIONS`).  Two kinds:

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
that route or qualify it, a task's expiry too); see :meth:`Signer.sign`.

Which codecs a broker decodes: plain data always; ``pickle`` and
``cloudpickle`` only when its own codec is one of them (:func:`accepts`), so a
host or client configured for JSON never unpickles, even what a key holder
signed.
"""

from __future__ import annotations

import functools
import hmac
import os
from typing import Any, Final, TypeAlias, final

from prefork import Serializer
from prefork_redis.errors import CodecError

__all__ = [
    "NETWORK_OPTIONS",
    "PROTOCOL",
    "SECRET_ENV",
    "Codec",
    "Signer",
    "accepts",
    "codec_names",
    "get_codec",
    "require_signer",
]

#: The environment variable read when no ``secret`` is passed.
SECRET_ENV: Final = "PREFORK_REDIS_SECRET"
#: An HMAC key shorter than this is refused as a likely mistake.
MIN_SECRET_BYTES: Final = 16
#: The protocol version: a task entry's ``v`` field, and the tag its signature frame starts with.
#: v2 added ``v`` and ``expires`` (signed); a v1 entry is dead-lettered unopened.
PROTOCOL: Final = "2"
_FRAME_TAG: Final = b"prefork-redis/" + PROTOCOL.encode()


#: A codec is a prefork serializer: ``name``, ``objects`` (can decoding run code?),
#: ``dumps`` and ``loads``.
Codec: TypeAlias = Serializer


#: Options of prefork's serializers for messages that cross hosts: JSON stays
#: standard (other languages read it), and cloudpickle sends every function by
#: value (another host's ``__main__`` is not this one's).
NETWORK_OPTIONS: Final[dict[str, dict[str, Any]]] = {"json": {"allow_nan": False}, "cloudpickle": {"always": True}}


@functools.lru_cache(maxsize=1)
def _registry() -> Any:
    """prefork's strategy registry: its built-in serializers and those of installed
    plugins (``msgpack`` comes with prefork-msgpack)."""
    from prefork.plugins import build_plugin_manager, build_registry

    return build_registry(build_plugin_manager())


def codec_names() -> list[str]:
    """The names a message's ``codec`` field may hold: prefork's serializers."""
    names: list[str] = _registry().names("serializer")
    return names


@functools.cache
def get_codec(name: str) -> Codec:
    """prefork's serializer called ``name``, with its network options;
    :class:`CodecError` names the known ones on a miss."""
    if name not in codec_names():
        raise CodecError(
            f"unknown codec {name!r}; the codecs are prefork's serializers: {', '.join(map(repr, codec_names()))}"
        )
    codec: Codec = _registry().create("serializer", name, NETWORK_OPTIONS.get(name, {}))
    return codec


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
        signs a task over ``(task id, reply_to, codec, expires, payload)`` and a
        result over ``(task id, status, codec, payload)``.
        """
        frame = b"".join([len(part).to_bytes(8, "big") + part for part in (_FRAME_TAG, kind.encode(), *fields)])
        return hmac.digest(self._key, frame, "sha256").hex().encode()  # one call into C: no per-part updates

    def verify(self, signature: bytes | None, kind: str, *fields: bytes) -> bool:
        """Whether ``signature`` is this key's signature of the message (constant time)."""
        if not signature:
            return False
        return hmac.compare_digest(signature, self.sign(kind, *fields))


def accepts(own: Codec, other: Codec) -> bool:
    """Whether a broker whose codec is ``own`` decodes a message in ``other``: plain data
    always, an object codec only when ``own`` is one (its key holders are trusted with code)."""
    return not other.objects or own.objects


def require_signer(codec: Codec, signer: Signer | None) -> None:
    """Refuse an object codec without an HMAC key, saying why and how to give one."""
    if codec.objects and signer is None:
        raise CodecError(
            f"codec {codec.name!r} can run code hidden in the messages it decodes, so prefork-redis "
            f"only uses it with an HMAC key that signs every message: pass secret=... or set "
            f"{SECRET_ENV}; or choose a plain-data codec ('json', 'msgpack')"
        )
