"""The ``redis`` transport strategy: prefork's pipes to the workers, plus a broker.

Workers still talk to their supervisor over the ``pipe`` transport's
socketpairs (forked workers never open broker connections); what this
strategy adds is where the tasks come from and the results go: the Redis
stream of an app, as options a user writes in ``prefork.toml``::

    app = "prefork_redis:serve"        # `prefork run` serves the stream until stopped

    [transport]
    name = "redis"
    url = "redis://10.0.0.5:6379/0"
    stream = "thumbnails"
    # secret: $PREFORK_REDIS_SECRET (a host refuses to start without a key, unless insecure = true)

    [resolver]
    name = "allow"                     # what remote tasks may call: nothing else
    allow = ["thumbnails.tasks:*"]
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from prefork.errors import OptionError
from prefork.strategies.transport import PipeTransport
from prefork_redis.codec import MIN_SECRET_BYTES, SECRET_ENV

if TYPE_CHECKING:
    from prefork_redis.broker import Broker

#: The longest socket timeout accepted (seconds).
MAX_SOCKET_TIMEOUT_S: Final = 300.0


def _url(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith(("redis://", "rediss://", "unix://")):
        raise OptionError(attribute.name, value, "must be a redis://, rediss:// or unix:// URL")


def _positive(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OptionError(attribute.name, value, "must be an integer >= 1")


def _flag(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(attribute.name, value, "must be true or false")


def _stream(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value or "{" in value or "}" in value:
        raise OptionError(attribute.name, value, "must be a non-empty name without braces")


def _seconds(instance: Any, attribute: Any, value: float) -> None:
    if not 0 < value <= MAX_SOCKET_TIMEOUT_S:
        raise OptionError(attribute.name, value, f"must be more than 0 and at most {MAX_SOCKET_TIMEOUT_S:g} seconds")


class _Hidden:
    """A secret in an error message: its length, never its bytes."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"<hidden, {self.size} bytes>"


def _secret(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise OptionError(attribute.name, _Hidden(len(str(value))), "must be a string")
    size = len(value.encode())
    if value and size < MIN_SECRET_BYTES:
        raise OptionError(
            attribute.name, _Hidden(size),
            f"must be at least {MIN_SECRET_BYTES} bytes: python -c 'import secrets; print(secrets.token_hex(32))'",
        )  # fmt: skip


def _codec(instance: Any, attribute: Any, value: Any) -> None:
    from prefork_redis.codec import codec_names

    if not isinstance(value, str) or value not in codec_names():
        raise OptionError(attribute.name, value, f"must be one of prefork's serializers: {', '.join(codec_names())}")


@attrs.frozen
class RedisTransport(PipeTransport):
    """Pipes to the workers; tasks from, and results to, a Redis stream (see prefork-redis)."""

    name: ClassVar[str] = "redis"
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_url, metadata={"doc": "the Redis server"})
    stream: str = attrs.field(
        default="prefork", validator=_stream,
        metadata={"doc": "the app name: its keys are pf:{stream}:..., shared by its clients and hosts"},
    )  # fmt: skip
    codec: str = attrs.field(
        default="json", validator=_codec,
        metadata={"doc": "json or msgpack; pickle or cloudpickle to also accept (signed) tasks in those codecs"},
    )  # fmt: skip
    lease_ms: int = attrs.field(
        default=30_000, validator=_positive, metadata={"doc": "a task not renewed for this long goes to another host"}
    )
    max_deliveries: int = attrs.field(
        default=5, validator=_positive, metadata={"doc": "deliveries before a task is dead-lettered"}
    )
    block_ms: int = attrs.field(
        default=2_000, validator=_positive, metadata={"doc": "longest wait for new tasks in one fetch"}
    )
    secret: str = attrs.field(
        default="", repr=False, validator=_secret,
        metadata={"doc": f"HMAC key (>= 16 bytes) every task must be signed with; empty: ${SECRET_ENV}"},
    )  # fmt: skip
    insecure: bool = attrs.field(
        default=False, validator=_flag,
        metadata={"doc": "true: no key, accept unsigned tasks (anyone who can write to Redis submits work)"},
    )  # fmt: skip
    allow_any_import: bool = attrs.field(
        default=False, validator=_flag,
        metadata={"doc": "true: a task may call any function the pool's resolver finds, imports included"},
    )  # fmt: skip
    socket_timeout: float = attrs.field(
        default=10.0, converter=float, validator=_seconds,
        metadata={"doc": "seconds before a Redis call that gets no answer fails (and is retried)"},
    )  # fmt: skip
    cluster: bool = attrs.field(
        default=False, validator=_flag,
        metadata={"doc": "true: url is one node of a Redis Cluster (the app's keys share one slot)"},
    )  # fmt: skip

    def __attrs_post_init__(self) -> None:
        has_key = bool(self.secret or os.environ.get(SECRET_ENV))
        if not has_key and not self.insecure:
            raise OptionError(
                "secret", self.secret,
                f"a host needs an HMAC key to tell its clients' tasks from anyone else's: set secret or "
                f"${SECRET_ENV}, or insecure = true to run unsigned tasks from anyone who can write to Redis",
            )  # fmt: skip
        if has_key and self.insecure:
            where = "secret" if self.secret else f"${SECRET_ENV}"
            raise OptionError("insecure", True, f"contradicts the key in {where}: with a key every task is checked")
        from prefork_redis.codec import get_codec

        if self.insecure and get_codec(self.codec).objects:
            raise OptionError("codec", self.codec, "runs code when decoded: it needs a secret, never insecure = true")
        if self.block_ms >= self.socket_timeout * 1000:
            raise OptionError("block_ms", self.block_ms, f"must be shorter than socket_timeout ({self.socket_timeout:g} s)")

    def broker(self) -> Broker:
        """A new broker (one consumer) for these options."""
        from prefork_redis.broker import Broker

        return Broker.from_url(
            self.url, self.stream, codec=self.codec, lease_ms=self.lease_ms, max_deliveries=self.max_deliveries,
            secret=self.secret or None, insecure=self.insecure, socket_timeout=self.socket_timeout,
            cluster=self.cluster,
        )  # fmt: skip
