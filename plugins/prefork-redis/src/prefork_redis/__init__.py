"""prefork-redis: scale prefork out through Redis Streams.

Clients on any host submit tasks to one Redis stream per app; a prefork
supervisor on each host is one consumer of that stream and runs what it
fetches in its forked workers (which never talk to Redis).  Results come back
on one stream per client.  :class:`Broker` is protocol v2 (see ``README.md``
and :mod:`prefork_redis.broker`); :mod:`prefork_redis.codec` holds the codecs
and the HMAC signing every task needs (unless a host says ``insecure``).

This module is installed as the ``redis`` plugin of the ``prefork``
entry-point group: it registers the ``redis`` transport strategy
(:mod:`prefork_redis.transport`) and the ``allow`` resolver
(:mod:`prefork_redis.allow`: what remote tasks may call).  :func:`serve` runs a stream's tasks in a
prefork pool (``app = "prefork_redis:serve"`` for ``prefork run``);
:class:`Client` submits to the hosts from anywhere.  prefork imports this
module whenever it builds a plugin manager, so it imports nothing heavy: the
broker (and redis-py, ~120 ms) are imported on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prefork import hookimpl

if TYPE_CHECKING:
    from prefork_redis.allow import AllowResolver
    from prefork_redis.broker import Broker
    from prefork_redis.client import Client, DeadLettered, DispatcherClient, RemoteError
    from prefork_redis.codec import Signer, get_codec
    from prefork_redis.errors import (
        BadSignature,
        BrokerError,
        BrokerUnavailable,
        CodecError,
        GroupMissing,
        ServerTooOld,
        TaskLost,
    )
    from prefork_redis.records import DEAD, ERROR, OK, REJECTED, Keys, Result, Task
    from prefork_redis.serve import serve, task_id
    from prefork_redis.transport import RedisTransport

__all__ = [
    "DEAD",
    "ERROR",
    "OK",
    "REJECTED",
    "AllowResolver",
    "BadSignature",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Client",
    "CodecError",
    "DeadLettered",
    "DispatcherClient",
    "GroupMissing",
    "Keys",
    "RedisTransport",
    "RemoteError",
    "Result",
    "ServerTooOld",
    "Signer",
    "Task",
    "TaskLost",
    "get_codec",
    "serve",
    "task_id",
]

_HOME = {
    "AllowResolver": "prefork_redis.allow",
    "Broker": "prefork_redis.broker",
    "Client": "prefork_redis.client",
    "DeadLettered": "prefork_redis.client",
    "DispatcherClient": "prefork_redis.client",
    "RemoteError": "prefork_redis.client",
    "serve": "prefork_redis.serve",
    "task_id": "prefork_redis.serve",
    "RedisTransport": "prefork_redis.transport",
    "DEAD": "prefork_redis.records",
    "ERROR": "prefork_redis.records",
    "OK": "prefork_redis.records",
    "REJECTED": "prefork_redis.records",
    "Keys": "prefork_redis.records",
    "Result": "prefork_redis.records",
    "Task": "prefork_redis.records",
    "Signer": "prefork_redis.codec",
    "get_codec": "prefork_redis.codec",
    "BadSignature": "prefork_redis.errors",
    "BrokerError": "prefork_redis.errors",
    "BrokerUnavailable": "prefork_redis.errors",
    "TaskLost": "prefork_redis.errors",
    "CodecError": "prefork_redis.errors",
    "GroupMissing": "prefork_redis.errors",
    "ServerTooOld": "prefork_redis.errors",
}


def __getattr__(name: str) -> Any:
    try:
        module = _HOME[name]
    except KeyError:
        raise AttributeError(f"module 'prefork_redis' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    from prefork_redis.allow import AllowResolver
    from prefork_redis.transport import RedisTransport

    registry.register("transport", RedisTransport)
    registry.register("resolver", AllowResolver)
