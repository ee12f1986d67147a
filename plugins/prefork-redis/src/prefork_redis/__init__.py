"""prefork-redis: scale prefork out through Redis Streams.

Clients on any host submit tasks to one Redis stream per app; a prefork
supervisor on each host is one consumer of that stream and runs what it
fetches in its forked workers (which never talk to Redis).  Results come back
on one stream per client.  :class:`Broker` is protocol v1 (see ``README.md``
and :mod:`prefork_redis.broker`); :mod:`prefork_redis.codec` holds the codecs
and the HMAC signing that makes ``pickle`` safe to accept.

This module is installed as the ``redis`` plugin of the ``prefork``
entry-point group.  It has no hook implementations yet: the ``redis``
transport strategy comes with the supervisor integration.  prefork imports
it whenever it builds a plugin manager, so it imports nothing heavy: the
broker (and redis-py, ~120 ms) are imported on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefork_redis.broker import Broker
    from prefork_redis.codec import Signer, get_codec
    from prefork_redis.errors import BadSignature, BrokerError, CodecError, GroupMissing, ServerTooOld
    from prefork_redis.records import DEAD, ERROR, OK, REJECTED, Keys, Result, Task

__all__ = [
    "DEAD",
    "ERROR",
    "OK",
    "REJECTED",
    "BadSignature",
    "Broker",
    "BrokerError",
    "CodecError",
    "GroupMissing",
    "Keys",
    "Result",
    "ServerTooOld",
    "Signer",
    "Task",
    "get_codec",
]

_HOME = {
    "Broker": "prefork_redis.broker",
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
