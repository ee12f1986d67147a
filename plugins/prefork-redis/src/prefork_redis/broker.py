"""The broker: protocol v2 of prefork's Redis Streams transport.

::

    client ── submit ──▶ pf:{app}:tasks ── fetch / reap ──▶ supervisor (consumer host:pid:nonce)
       ▲                 (group "workers")                     │ renew every lease/3
       │                                                        │ release when a worker dies
       └── results ◀── pf:{app}:results:<client> ◀── complete ──┘ (or dead-letter ──▶ pf:{app}:dead)

A **client** submits a task (deduplicated by task id) to the task stream and
reads its results from its own result stream.  A **supervisor** is one
consumer of the group: it fetches at most as many tasks as it has free slots,
renews the lease of those it runs, completes them (publish + ack + delete, in
one script, only while it still owns the entry), releases those whose worker
died, and reaps the entries of consumers that stopped renewing.  An entry
delivered ``max_deliveries`` times is dead-lettered instead of delivered again.

Ownership is Redis's own: an entry belongs to the consumer the group's
pending list names.  Every step that depends on it checks it inside a Lua
script (see :mod:`prefork_redis._scripts`), so a consumer that lost an entry
can neither renew it nor publish its result.

Authentication comes before anything is decoded or run: a task must carry
this broker's HMAC signature over its id, client, codec, expiry and payload
(unless the broker was made ``insecure=True``, without a key); it is then
*admitted* by one script per fetch, which refuses a task id already owned by
another entry (a replay) and a task past its signed expiry, by the server's
clock.  Each broker also remembers the task ids it admitted, so a replay is
refused by a host that ran the task even if someone deleted the dedup key.

The calls raise redis-py's errors while the server is unreachable; the
callers (:func:`prefork_redis.serve`, :class:`prefork_redis.Client`) retry
them.  Every step is safe to repeat after an error whose outcome is unknown
(the reply was lost): submit is deduplicated by task id, completion and
release check ownership, and a delivery whose reply was lost is reaped back
by its own consumer after a lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from prefork_redis import _scripts
from prefork_redis._consumer import RELEASED, SEND_BATCH, Consumer, check_server_version, consumer_name
from prefork_redis._link import Links, raw_entries, text
from prefork_redis._screening import check_positive
from prefork_redis.codec import PROTOCOL, SECRET_ENV, Codec, Signer, get_codec, require_signer
from prefork_redis.errors import BrokerError
from prefork_redis.records import Keys, Result, check_name

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = ["RELEASED", "SEND_BATCH", "Broker", "Envelope", "check_server_version", "consumer_name"]

log = logging.getLogger("prefork_redis")


@attrs.frozen
class Envelope:
    """A task ready to send: its entry's fields, signed.  Sending it again (after an error
    whose outcome is unknown) is harmless: the dedup key queues a task id once."""

    task_id: str
    fields: tuple[bytes | str, ...] = attrs.field(repr=False)
    expires_at: float


class Broker(Consumer):
    """One app's task stream, used by clients (submit, results) and supervisors (the rest).

    ``client`` must return bytes (``decode_responses=False``, the default).  Its
    ``socket_timeout`` must be longer than the longest ``block_ms`` passed to
    :meth:`fetch` or :meth:`results`; :meth:`from_url` sets 10 s.

    ``codec`` encodes what this broker submits and is the default of its
    results; a supervisor decodes each task with the codec the task names, if
    it :func:`accepts <prefork_redis.codec.accepts>` it (object codecs only
    when ``codec`` is one).  ``secret`` (or ``$PREFORK_REDIS_SECRET``) is the
    HMAC key: every message is signed and every received message must carry a
    valid signature.  Without a key the broker must be made ``insecure=True``:
    it then sends and accepts unsigned plain-data messages, and anyone who can
    write to the Redis server can submit tasks.  ``task_ttl_s`` is how long a
    submitted task may wait to be started (signed into it as ``expires``).

    Creating a broker does no I/O.  A supervisor calls :meth:`setup` once
    (the first :meth:`fetch` or :meth:`reap` does it otherwise).
    """

    __slots__ = (
        "_admit",
        "_claim",
        "_codec",
        "_complete",
        "_dead_letter",
        "_fetch_script",
        "_forget",
        "_io",
        "_redis",
        "_release",
        "_renew",
        "_seen",
        "_seen_lock",
        "_signer",
        "_submit",
        "consumer",
        "dead_maxlen",
        "dedup_ttl_s",
        "group",
        "insecure",
        "keys",
        "lease_ms",
        "max_deliveries",
        "result_maxlen",
        "result_ttl_s",
        "task_ttl_s",
    )

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        app: str,
        *,
        codec: str = "json",
        secret: str | bytes | None = None,
        insecure: bool = False,
        group: str = "workers",
        consumer: str | None = None,
        lease_ms: int = 30_000,
        max_deliveries: int = 5,
        result_maxlen: int = 10_000,
        result_ttl_s: int = 86_400,
        dead_maxlen: int = 100_000,
        dedup_ttl_s: int = 86_400,
        task_ttl_s: int = 3_600,
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise BrokerError(
                "the Redis client decodes responses to str (decode_responses=True); payloads are bytes: "
                "give the broker a client made with decode_responses=False"
            )
        self._redis = client
        self._io = Links(client)
        self.keys = Keys(app)
        self._codec: Codec = get_codec(codec)
        self._signer = Signer.from_secret(secret)
        require_signer(self._codec, self._signer)
        if not isinstance(insecure, bool):
            raise BrokerError(f"insecure must be True or False, not {insecure!r}")
        if self._signer is None and not insecure:
            raise BrokerError(
                "no HMAC key: every task must be signed, so that only holders of the key can submit work. "
                f"Pass secret=... or set {SECRET_ENV} (the same key as the hosts'), or insecure=True to send "
                "and accept unsigned messages (then anyone who can write to the Redis server can submit tasks)"
            )
        if self._signer is not None and insecure:
            raise BrokerError(
                f"insecure=True contradicts the HMAC key given (secret= or ${SECRET_ENV}): with a key every "
                "message is signed and checked; drop one of them"
            )
        self.insecure = insecure
        for name, value in (
            ("lease_ms", lease_ms),
            ("max_deliveries", max_deliveries),
            ("result_maxlen", result_maxlen),
            ("result_ttl_s", result_ttl_s),
            ("dead_maxlen", dead_maxlen),
            ("dedup_ttl_s", dedup_ttl_s),
            ("task_ttl_s", task_ttl_s),
        ):
            check_positive(name, value)
        if task_ttl_s > dedup_ttl_s:
            raise BrokerError(
                f"task_ttl_s={task_ttl_s} is longer than dedup_ttl_s={dedup_ttl_s}: a task's dedup key must "
                "outlive the time the task may wait to start"
            )
        check_name("the group name", group)
        self.group = group
        self.consumer = consumer or consumer_name()
        if self.consumer == RELEASED:
            raise BrokerError(f"the consumer name {RELEASED!r} is reserved for released entries")
        self.lease_ms = lease_ms
        self.max_deliveries = max_deliveries
        self.result_maxlen = result_maxlen
        self.result_ttl_s = result_ttl_s
        self.dead_maxlen = dead_maxlen
        self.dedup_ttl_s = dedup_ttl_s
        self.task_ttl_s = task_ttl_s
        self._ready = False
        self._after = ""  # the id to wait after for new entries, when the last fetch took fewer than asked
        # task id -> (entry id, expires at, done here): the tasks this broker admitted
        self._seen: OrderedDict[str, tuple[str, float, bool]] = OrderedDict()
        self._seen_lock = threading.Lock()
        # register_script only hashes the source; the script is loaded on first use.
        self._submit = client.register_script(_scripts.SUBMIT)
        self._admit = client.register_script(_scripts.ADMIT)
        self._renew = client.register_script(_scripts.RENEW)
        self._complete = client.register_script(_scripts.COMPLETE)
        self._release = client.register_script(_scripts.RELEASE)
        self._claim = client.register_script(_scripts.CLAIM)
        self._fetch_script = client.register_script(_scripts.FETCH)
        self._dead_letter = client.register_script(_scripts.DEAD_LETTER)
        self._forget = client.register_script(_scripts.FORGET)

    @classmethod
    def from_url(
        cls, url: str, app: str, *, socket_timeout: float = 10.0, cluster: bool = False, **options: Any
    ) -> Broker:
        """A broker on a new client for ``url`` (``redis://host:port/db``).

        ``socket_timeout`` (seconds) bounds every call, so a frozen server is an
        error after that long.  The client does not retry by itself (redis-py's
        default retries a failed call up to 10 times, each waiting the socket
        timeout, and repeats commands whose first run may have happened): the
        callers retry, knowing which steps are safe to repeat.

        ``cluster=True``: ``url`` is one node of a Redis Cluster, and the client
        (``redis.cluster.RedisCluster``) finds the others and follows the app's
        slot (all its keys share one) when it moves or its primary fails over;
        redis-py retries a call a few times then (every step is safe to repeat).
        """
        if not isinstance(socket_timeout, int | float) or isinstance(socket_timeout, bool) or socket_timeout <= 0:
            raise BrokerError(f"socket_timeout must be a positive number of seconds, not {socket_timeout!r}")
        if not isinstance(cluster, bool):
            raise BrokerError(f"cluster must be True or False, not {cluster!r}")
        timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": min(5.0, socket_timeout)}
        if cluster:
            from redis.cluster import RedisCluster

            return cls(RedisCluster.from_url(url, **timeouts), app, **options)
        return cls(redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **timeouts), app, **options)

    def __repr__(self) -> str:
        return f"Broker(app={self.keys.app!r}, group={self.group!r}, consumer={self.consumer!r}, codec={self._codec.name!r})"

    @property
    def codec(self) -> str:
        return self._codec.name

    @property
    def where(self) -> str:
        """The server, as ``host:port`` (or ``unix:path``), for messages."""
        return self._where()

    # -- client side --------------------------------------------------------------

    def submit(self, task_id: str, value: Any, reply_to: str, *, encoded: bool = False) -> str | None:
        """Queue ``value`` as task ``task_id``; results go to client ``reply_to``.

        Returns the entry id, or None when ``task_id`` was submitted before
        (within ``dedup_ttl_s``): it is not queued twice.  ``encoded=True``
        means ``value`` is already bytes in this broker's codec.  The task
        expires ``task_ttl_s`` from now: no host starts it after that.
        """
        return self.send(self.prepare(task_id, value, reply_to, encoded=encoded))

    def prepare(self, task_id: str, value: Any, reply_to: str, *, encoded: bool = False) -> Envelope:
        """The signed entry of a task, without sending it (no I/O); encoding errors are raised here."""
        if not task_id or not isinstance(task_id, str):
            raise BrokerError(f"a task id must be a non-empty string, not {task_id!r}")
        if not reply_to or not isinstance(reply_to, str):
            raise BrokerError(f"reply_to must be a client id (a non-empty string), not {reply_to!r}")
        payload = self._encode(value, encoded)
        now = time.time()
        expires_at = now + self.task_ttl_s
        tid, to, codec = task_id.encode(), reply_to.encode(), self._codec.name.encode()
        expires = str(int(expires_at * 1000)).encode()
        fields: list[bytes | str] = [
            "v", PROTOCOL, "id", tid, "reply_to", to, "codec", codec, "expires", expires,
            "submitted_at", f"{now:.6f}", "payload", payload,
        ]  # fmt: skip
        if self._signer is not None:
            fields += ["signature", self._signer.sign("task", tid, to, codec, expires, payload)]
        return Envelope(task_id, tuple(fields), expires_at)

    def send(self, envelope: Envelope) -> str | None:
        """Queue a prepared task: its entry id, or None when its id was queued already
        (by an earlier send whose reply was lost, say)."""
        return self.send_many([envelope])[0]

    def send_many(self, envelopes: Sequence[Envelope]) -> list[str | None]:
        """Queue prepared tasks in one round trip per :data:`SEND_BATCH` of them (one script
        call); for each, as :meth:`send`: its entry id, or None when its id was queued already."""
        out: list[str | None] = []
        for start in range(0, len(envelopes), SEND_BATCH):
            batch = envelopes[start : start + SEND_BATCH]
            args: list[Any] = [self.dedup_ttl_s]
            for envelope in batch:
                args += [len(envelope.fields), *envelope.fields]
            keys = [self.keys.tasks, *(self.keys.dedup(e.task_id) for e in batch)]
            out += [None if entry_id is None else text(entry_id) for entry_id in self._run(self._submit, keys, args)]
        return out

    def results(
        self,
        client_id: str,
        last_id: str = "0-0",
        *,
        count: int = 100,
        block_ms: int | None = None,
        delete: bool = True,
        handled: Sequence[str] = (),
    ) -> list[Result]:
        """The results for ``client_id`` after ``last_id``, at most ``count``, oldest first.

        Waits up to ``block_ms`` for the first one (None: does not wait).  With
        ``delete`` (the default) the results returned are deleted from the
        stream, so the next call may pass ``"0-0"`` again; otherwise pass the
        last ``entry_id`` seen.  A result whose signature does not verify, or in
        an object codec this broker does not accept, comes back with status
        ``rejected`` and is never decoded.

        With ``delete``, an error (a timeout) after the read loses the results
        read: the delete may still run on the server after the error.  To read
        each result at least once, pass ``delete=False``, handle the results,
        then :meth:`delete_results` them, or pass their entry ids as ``handled`` to
        the next call, which deletes them in the same round trip as its read (as
        :class:`prefork_redis.Client` does).
        """
        check_positive("count", count)
        self._check_block(block_ms)
        key = self.keys.results(client_id)
        read: list[Any] = ["XREAD", "COUNT", count, "STREAMS", key, last_id]
        if block_ms is not None:
            read[3:3] = ["BLOCK", block_ms]
        # with handled results: one round trip, the delete then the read (which may block)
        replies = self._io.pipeline(("XDEL", key, *handled), read) if handled else self._io.pipeline(read)
        for item in replies:
            if isinstance(item, Exception):
                raise (self._group_missing(item) if isinstance(item, redis.ResponseError) else item) from item
        reply = replies[-1]
        out = [self._open_result(key, entry_id, fields) for entry_id, fields in raw_entries(reply)]
        if delete and out:
            self.delete_results(client_id, [r.entry_id for r in out])
        return out

    def delete_results(self, client_id: str, entry_ids: Sequence[str]) -> int:
        """Delete results already handled from ``client_id``'s stream; how many were there."""
        if not entry_ids:
            return 0
        deleted: int = self._io.client().xdel(self.keys.results(client_id), *entry_ids)
        return deleted

    def missing(self, tasks: Mapping[str, str | None]) -> list[str]:
        """Which of ``tasks`` (task id -> entry id, or None if unknown) Redis has no trace
        of: neither the dedup key nor the entry.  Such a task will never be started
        (a restart without persistence lost it); read the results first, since a
        completed task has no entry either."""
        ids = list(tasks)
        if not ids:
            return []
        pipe = self._io.client().pipeline(transaction=False)
        for task_id in ids:
            pipe.exists(self.keys.dedup(task_id))
            entry_id = tasks[task_id]
            if entry_id:
                pipe.xrange(self.keys.tasks, entry_id, entry_id, count=1)
            else:
                pipe.exists(self.keys.tasks)  # a placeholder: an unknown entry counts as gone
        replies = pipe.execute()
        gone = []
        for i, task_id in enumerate(ids):
            has_key, entry = replies[2 * i], replies[2 * i + 1]
            if not has_key and not (tasks[task_id] and entry):
                gone.append(task_id)
        return gone

    def server_id(self) -> str:
        """The server's ``run_id``: a new one after every restart (in a cluster, the primary's
        of the app's slot: a new one after a failover, too)."""
        client = self._io.client()
        if self._io.cluster:
            return text(client.info("server", target_nodes=client.get_node_from_key(self.keys.tasks)).get("run_id"))
        return text(client.info("server").get("run_id"))

    def close(self) -> None:
        """Give back the connections this broker's threads hold (to the pool of the client it
        was given).  A call after it opens new ones."""
        self._io.close()
