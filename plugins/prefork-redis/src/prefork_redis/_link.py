"""One connection to Redis per thread, and pipelines on it: the broker's I/O.

A ``redis.Redis`` client takes a connection from its pool for every command
and, before using it, checks that nothing is left to read on it: a
non-blocking ``recv`` between two ``settimeout`` calls, three system calls
that each release the GIL.  In a supervisor whose fetch loop, completion
thread and pool loop share the GIL, each release may hand it to another
thread, and a fetch waited for it several times per command.  So each thread
of a broker gets a client of its own holding one connection
(``single_connection_client``): a command is one send and one receive.
Connections come from the broker's client's pool (its options, its limits),
and go back to it when the thread ends or the broker is closed.

A Redis Cluster client (``redis.cluster.RedisCluster``) routes each command
to the node of its slot; it is used as it is, from every thread.

:meth:`Links.pipeline` sends several commands in one write and reads their
replies in order, raw (each error reply as its exception, in its place): the
broker's fetch (a blocking ``XREAD`` with ``FETCH`` behind it) and its
result read (``XDEL`` of the results handled, then ``XREAD``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import redis

__all__ = ["Links", "pairs", "raw_entries", "text"]


def text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    """``[k1, v1, k2, v2...]`` as a dict (a stream entry's fields, as Redis sends them)."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def raw_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a raw XREAD reply on one stream (RESP2: ``[[key, entries]]``; RESP3: a
    map), each ``[id, [field, value...]]``; or of a reply redis-py's callbacks already shaped."""
    if not reply:
        return []
    chunks = list(reply.values()) if isinstance(reply, dict) else [item[1] for item in reply]
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for chunk in chunks:
        if chunk and isinstance(chunk[0], list) and chunk[0] and isinstance(chunk[0][0], list | tuple):
            chunk = chunk[0]  # RESP3 through redis-py's callbacks wraps the entry list once more
        for entry_id, fields in chunk:
            out.append((entry_id, fields if isinstance(fields, dict) else pairs(fields or [])))
    return out


class _Local(threading.local):
    client: redis.Redis | None = None


class Links:
    """The per-thread clients of one broker (see the module's docstring)."""

    __slots__ = ("_base", "_clients", "_local", "_lock", "cluster")

    def __init__(self, base: Any) -> None:
        self._base = base
        self.cluster = not hasattr(base, "connection_pool")  # RedisCluster: routes by slot itself
        self._local = _Local()
        self._lock = threading.Lock()
        self._clients: list[redis.Redis] = []

    def client(self) -> Any:
        """This thread's client: one connection, made on first use (a command may raise
        redis-py's ConnectionError here, as it would when sent)."""
        if self.cluster:
            return self._base
        client = self._local.client
        if client is None:
            client = redis.Redis(connection_pool=self._base.connection_pool, single_connection_client=True)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def pipeline(self, *commands: Sequence[Any]) -> list[Any]:
        """Send ``commands`` at once and read each raw reply, in order; an error reply is its
        exception (``ResponseError``...) in its place.  A connection error or timeout is
        raised, and the connection closed (the next command opens it again)."""
        if self.cluster:
            pipe = self._base.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies
        conn = self.client().connection
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            out: list[Any] = []
            for _ in commands:
                try:
                    out.append(conn.read_response())
                except redis.ResponseError as exc:
                    out.append(exc)
            return out
        except BaseException:
            conn.disconnect()
            raise

    def close(self) -> None:
        """Give every thread's connection back to the pool (a thread that uses the broker
        again later opens a new one)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = _Local()
