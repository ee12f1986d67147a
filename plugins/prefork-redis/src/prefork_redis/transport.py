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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from prefork.errors import OptionError
from prefork.strategies.transport import PipeTransport

if TYPE_CHECKING:
    from prefork_redis.broker import Broker


def _url(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith(("redis://", "rediss://", "unix://")):
        raise OptionError(attribute.name, value, "must be a redis://, rediss:// or unix:// URL")


def _positive(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OptionError(attribute.name, value, "must be an integer >= 1")


@attrs.frozen
class RedisTransport(PipeTransport):
    """Pipes to the workers; tasks from, and results to, a Redis stream (see prefork-redis)."""

    name: ClassVar[str] = "redis"
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_url, metadata={"doc": "the Redis server"})
    stream: str = attrs.field(
        default="prefork", metadata={"doc": "the app name: its keys are pf:{stream}:..., shared by its clients and hosts"}
    )
    codec: str = attrs.field(
        default="json", metadata={"doc": "a serializer name; pickle and cloudpickle need $PREFORK_REDIS_SECRET"}
    )
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
        default="", repr=False,
        metadata={"doc": "HMAC key signing every message (needed for pickle codecs); empty: $PREFORK_REDIS_SECRET"},
    )  # fmt: skip

    def broker(self) -> Broker:
        """A new broker (one consumer) for these options."""
        from prefork_redis.broker import Broker

        return Broker.from_url(
            self.url, self.stream, codec=self.codec, lease_ms=self.lease_ms, max_deliveries=self.max_deliveries,
            secret=self.secret or None,
        )  # fmt: skip
