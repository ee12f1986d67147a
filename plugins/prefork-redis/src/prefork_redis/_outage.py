"""Living through the Redis server's outages: which errors are one, backoff, and logging each once.

An outage is any stretch of time in which calls to Redis fail: the server
restarting (connection refused, then ``LOADING`` while it reads its AOF),
frozen or slow (``TimeoutError`` after the socket timeout), out of memory, a
replica not yet promoted, or its keys tampered with (``WRONGTYPE``).  Hosts
and clients live through all of them; only a mistake in the caller's own
arguments (redis-py's ``DataError``) is not one.  :class:`Outage` is shared by the
threads of one host or client: the first failure of an outage is logged once,
the recovery once, and each failure asks for a bounded delay with jitter
before the next try.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Final

import redis

__all__ = ["BACKOFF_BASE_S", "BACKOFF_CAP_S", "Outage", "backoff", "is_transient"]

#: The first retry waits about this long (0.5 to 1 times it, at random).
BACKOFF_BASE_S: Final = 0.05
#: No retry waits longer than this.
BACKOFF_CAP_S: Final = 2.0


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage of Redis (retry later) rather than a bug of the caller's.

    Every error of redis-py is one (connection refused or reset, timeouts,
    ``LOADING``, ``BUSY``, ``OOM``, ``READONLY``, and replies such as
    ``WRONGTYPE`` when someone overwrote a key), except ``DataError``: the
    arguments given were wrong before anything was sent.
    """
    return isinstance(exc, redis.RedisError) and not isinstance(exc, redis.DataError)


def backoff(failures: int, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: doubling from
    ``base`` up to ``cap``, times a random factor in [0.5, 1] so that many hosts
    do not come back in step."""
    delay: float = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 30))
    return delay * random.uniform(0.5, 1.0)


class Outage:
    """Whether Redis is reachable, as the threads of one process last saw it."""

    __slots__ = ("_failures", "_lock", "_log", "_since", "what")

    def __init__(self, what: str, log: logging.Logger) -> None:
        self.what = what
        self._log = log
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0

    @property
    def down_for(self) -> float:
        """Seconds since the outage began; 0 while Redis answers."""
        with self._lock:
            return 0.0 if self._since is None else time.monotonic() - self._since

    @property
    def down(self) -> bool:
        with self._lock:
            return self._since is not None

    def failed(self, exc: BaseException) -> float:
        """Record a failed call; log it if it begins an outage.  Returns the delay before the next try."""
        with self._lock:
            self._failures += 1
            failures = self._failures
            first = self._since is None
            if first:
                self._since = time.monotonic()
        if first:
            self._log.warning(
                "%s: unavailable (%s: %s); retrying with backoff until it answers",
                self.what, type(exc).__name__, exc,
            )  # fmt: skip
        return backoff(failures)

    def ok(self) -> float | None:
        """Record a call that succeeded; when it ends an outage, log it and return how long it lasted."""
        with self._lock:
            if self._since is None:
                return None
            lasted = time.monotonic() - self._since
            self._since = None
            self._failures = 0
        self._log.warning("%s: available again after %.1f s", self.what, lasted)
        return lasted
