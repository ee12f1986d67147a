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

import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from prefork_redis import _scripts
from prefork_redis.codec import PROTOCOL, SECRET_ENV, Codec, Signer, accepts, get_codec, require_signer
from prefork_redis.errors import BrokerError, CodecError, GroupMissing, ServerTooOld
from prefork_redis.records import DEAD, ERROR, OK, REJECTED, Keys, Result, Task, check_name

if TYPE_CHECKING:
    from redis.commands.core import Script

__all__ = ["RELEASED", "Broker", "Envelope", "check_server_version", "consumer_name"]

log = logging.getLogger("prefork_redis")

#: The consumer that holds released entries until someone claims them.  Real
#: consumer names contain two colons, so it cannot clash with one.
RELEASED: Final = "~released"

#: The oldest server with XAUTOCLAIM-era stream commands (XPENDING IDLE, exclusive ranges).
MIN_SERVER: Final = (6, 2)
#: How many pending entries one claim script looks at, at most.
SCAN_LIMIT: Final = 1000
#: The longest BLOCK a fetch may ask for.
MAX_BLOCK_MS: Final = 60_000
#: How many admitted task ids a broker remembers (oldest forgotten first), to refuse
#: replays even when the dedup key in Redis was deleted.
SEEN_LIMIT: Final = 100_000
#: A remembered task id is forgotten this long after it expired (clock skew between hosts and Redis).
SEEN_SLACK_S: Final = 300.0


def consumer_name() -> str:
    """``host:pid:nonce``, unique per supervisor (the nonce tells restarts with a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BrokerError(f"{name} must be a positive integer, not {value!r}")


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


@attrs.frozen
class Envelope:
    """A task ready to send: its entry's fields, signed.  Sending it again (after an error
    whose outcome is unknown) is harmless: the dedup key queues a task id once."""

    task_id: str
    fields: tuple[bytes | str, ...] = attrs.field(repr=False)
    expires_at: float


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD/XREADGROUP reply on one stream, in RESP2 or RESP3 shape."""
    if not reply:
        return []
    chunks = list(reply.values()) if isinstance(reply, dict) else [item[1] for item in reply]
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    for chunk in chunks:
        if chunk and isinstance(chunk[0], list):  # RESP3 wraps the entry list once more
            chunk = chunk[0]
        entries.extend((entry_id, fields or {}) for entry_id, fields in chunk)
    return entries


class Broker:
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
        "_forget",
        "_ready",
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
        client: redis.Redis,
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
            _check_positive(name, value)
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
        self._dead_letter = client.register_script(_scripts.DEAD_LETTER)
        self._forget = client.register_script(_scripts.FORGET)

    @classmethod
    def from_url(cls, url: str, app: str, *, socket_timeout: float = 10.0, **options: Any) -> Broker:
        """A broker on a new client for ``url`` (``redis://host:port/db``).

        ``socket_timeout`` (seconds) bounds every call, so a frozen server is an
        error after that long.  The client does not retry by itself (redis-py's
        default retries a failed call up to 10 times, each waiting the socket
        timeout, and repeats commands whose first run may have happened): the
        callers retry, knowing which steps are safe to repeat.
        """
        if not isinstance(socket_timeout, int | float) or isinstance(socket_timeout, bool) or socket_timeout <= 0:
            raise BrokerError(f"socket_timeout must be a positive number of seconds, not {socket_timeout!r}")
        client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=min(5.0, socket_timeout),
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        return cls(client, app, **options)

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
        keys = [self.keys.dedup(envelope.task_id), self.keys.tasks]
        entry_id = self._run(self._submit, keys, [self.dedup_ttl_s, *envelope.fields])
        return None if entry_id is None else _text(entry_id)

    def results(
        self,
        client_id: str,
        last_id: str = "0-0",
        *,
        count: int = 100,
        block_ms: int | None = None,
        delete: bool = True,
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
        then :meth:`delete_results` them, as :class:`prefork_redis.Client` does.
        """
        _check_positive("count", count)
        self._check_block(block_ms)
        key = self.keys.results(client_id)
        reply = self._redis.xread({key: last_id}, count=count, block=block_ms)
        out = [self._open_result(key, entry_id, fields) for entry_id, fields in _stream_entries(reply)]
        if delete and out:
            self.delete_results(client_id, [r.entry_id for r in out])
        return out

    def delete_results(self, client_id: str, entry_ids: Sequence[str]) -> int:
        """Delete results already handled from ``client_id``'s stream; how many were there."""
        if not entry_ids:
            return 0
        deleted: int = self._redis.xdel(self.keys.results(client_id), *entry_ids)
        return deleted

    def missing(self, tasks: Mapping[str, str | None]) -> list[str]:
        """Which of ``tasks`` (task id -> entry id, or None if unknown) Redis has no trace
        of: neither the dedup key nor the entry.  Such a task will never be started
        (a restart without persistence lost it); read the results first, since a
        completed task has no entry either."""
        ids = list(tasks)
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
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
        """The server's ``run_id``: a new one after every restart."""
        return _text(self._redis.info("server").get("run_id"))

    # -- supervisor side ----------------------------------------------------------

    def setup(self) -> None:
        """Check the server, create the group (at id 0, so earlier submits count) and mark this consumer alive."""
        version = _text(self._redis.info("server").get("redis_version"))
        check_server_version(version, self._where())
        try:
            self._redis.xgroup_create(self.keys.tasks, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._redis.set(self.keys.alive(self.consumer), 0, px=self.lease_ms)
        self._ready = True

    def fetch(self, count: int, block_ms: int | None = 1000) -> list[Task]:
        """At most ``count`` tasks for this consumer: released ones first, then new ones.

        Waits up to ``block_ms`` (None: not at all) when there is none.  A task
        that fails authentication or admission (unsigned, forged, a replay,
        expired, an old protocol, an unknown or refused codec) is dead-lettered
        here and not returned; so fewer than ``count`` may come back even when
        more were waiting.
        """
        _check_positive("count", count)
        self._check_block(block_ms)
        if not self._ready:
            self.setup()
        try:
            return self._fetch(count, block_ms)
        except GroupMissing:
            log.warning("%s: the group %r was gone; creating it again", self.keys.tasks, self.group)
            self.setup()
            return self._fetch(count, block_ms)

    def _fetch(self, count: int, block_ms: int | None) -> list[Task]:
        tasks = self._claim_entries(min_idle_ms=0, count=count, only=RELEASED)
        if len(tasks) < count:
            tasks += self._read_new(count - len(tasks), None if tasks else block_ms)
        return tasks

    def renew(self, entry_ids: Iterable[str]) -> list[str]:
        """Extend the lease of ``entry_ids`` and mark this consumer alive; return the ids it lost.

        A lost entry was claimed by another consumer (or completed, or
        dead-lettered): its run here should be dropped, and its completion
        would publish nothing.  Call it every ``lease_ms / 3`` or so, with no
        ids too, to keep the alive key.
        """
        ids = list(entry_ids)
        lost = self._run(
            self._renew,
            [self.keys.tasks, self.keys.alive(self.consumer)],
            [self.group, self.consumer, self.lease_ms, *ids],
        )
        return [_text(i) for i in lost]

    def complete(self, task: Task, result: Any, *, status: str = OK, encoded: bool = False) -> bool:
        """Publish ``result`` to the task's client, then ack and delete the entry: the ack point.

        Returns False, publishing nothing, when this consumer no longer owns
        the entry (its lease was lost, or an earlier call whose reply was lost
        completed it): a result is published at most once per entry.
        ``status`` is ``ok`` or ``error``.  The result is encoded with the
        task's codec (``encoded=True``: it already is, as bytes); an encoding
        error is raised before anything is published.
        """
        if status not in (OK, ERROR):
            raise BrokerError(f"a completion's status is 'ok' or 'error', not {status!r}")
        codec = get_codec(task.codec)
        payload = self._encode(result, encoded, codec)
        fields = self._result_fields(task.task_id, status, codec.name, payload)
        fields += ["entry", task.entry_id, "consumer", self.consumer]
        done = self._run(
            self._complete,
            [self.keys.tasks, self.keys.results(task.reply_to)],
            [self.group, self.consumer, task.entry_id, self.result_maxlen, self.result_ttl_s, *fields],
        )
        if done:  # answered: never again here.  A fenced run was not: its entry may come back, released
            self._mark_done(task.task_id)
        return bool(done)

    def release(self, entry_id: str) -> bool:
        """Give back an entry this consumer cannot finish (its worker died): the next fetch or
        reap of any consumer takes it, with no lease to wait out.

        The delivery count is not changed: the next claim counts the next
        delivery, so a task that kills every worker it meets is dead-lettered
        after ``max_deliveries``.  Returns False when the entry was not this
        consumer's any more.
        """
        return bool(self._run(self._release, [self.keys.tasks], [self.group, self.consumer, entry_id, RELEASED]))

    def reap(self, count: int, lease_ms: int | None = None) -> list[Task]:
        """Claim up to ``count`` entries not renewed for ``lease_ms`` (default: this
        broker's), and released ones; return them to run.

        This consumer's own entries count too: it renews every entry it runs,
        so its own entry idle for a lease is one whose delivery it never saw
        (the reply was lost with the connection) or stopped tracking.  Entries
        already delivered ``max_deliveries`` times are dead-lettered instead
        (not counted in ``count``, so ``count=0`` only dead-letters).
        Consumers whose alive key expired and that hold nothing are removed
        from the group.
        """
        if not isinstance(count, int) or count < 0:
            raise BrokerError(f"count must be an integer >= 0, not {count!r}")
        if not self._ready:
            self.setup()
        try:
            min_idle = self.lease_ms if lease_ms is None else lease_ms
            tasks = self._claim_entries(min_idle_ms=min_idle, count=count, mine=True)
            self._forget_gone_consumers()
        except GroupMissing:
            log.warning("%s: the group %r was gone; creating it again", self.keys.tasks, self.group)
            self.setup()
            return []
        return tasks

    def leave(self) -> None:
        """Stop being a consumer: drop the alive key, and this consumer from the group if it holds nothing."""
        self._redis.delete(self.keys.alive(self.consumer))
        self._run(self._forget, [self.keys.tasks, self.keys.alive(self.consumer)], [self.group, self.consumer])
        self._ready = False

    def consumers(self) -> dict[str, tuple[bool, int]]:
        """Each consumer of the group: (alive key present, entries held)."""
        info: list[dict[str, Any]] = self._redis.xinfo_consumers(self.keys.tasks, self.group)
        names = [_text(c["name"]) for c in info]
        alive = [bool(self._redis.exists(self.keys.alive(n))) for n in names]
        return {n: (a, int(c["pending"])) for n, a, c in zip(names, alive, info, strict=True)}

    # -- internals ----------------------------------------------------------------

    def _where(self) -> str:
        kw = self._redis.get_connection_kwargs()
        if "path" in kw:
            return f"unix:{kw['path']}"
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def _check_block(self, block_ms: int | None) -> None:
        if block_ms is None:
            return
        if not isinstance(block_ms, int) or isinstance(block_ms, bool) or not 1 <= block_ms <= MAX_BLOCK_MS:
            raise BrokerError(
                f"block_ms must be None (do not wait) or from 1 to {MAX_BLOCK_MS} ms, not {block_ms!r} "
                "(Redis reads BLOCK 0 as 'wait forever')"
            )
        timeout = self._redis.get_connection_kwargs().get("socket_timeout")
        if timeout is not None and block_ms >= timeout * 1000:
            raise BrokerError(
                f"block_ms={block_ms} would outlast the Redis client's socket_timeout={timeout} s; "
                "make the client's socket_timeout longer than the longest wait"
            )

    def _encode(self, value: Any, encoded: bool, codec: Codec | None = None) -> bytes:
        if encoded:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise BrokerError(f"encoded=True needs bytes, not {type(value).__name__}")
            return bytes(value)
        return (codec or self._codec).dumps(value)

    def _result_fields(self, task_id: str, status: str, codec: str, payload: bytes) -> list[bytes | str]:
        tid = task_id.encode()
        fields: list[bytes | str] = ["id", tid, "status", status, "codec", codec, "payload", payload]
        if self._signer is not None:
            fields += ["signature", self._signer.sign("result", tid, status.encode(), codec.encode(), payload)]
        return fields

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.ResponseError as exc:
            raise self._group_missing(exc) from exc

    def _group_missing(self, exc: redis.ResponseError) -> Exception:
        """A NOGROUP error (or UNBLOCKED: the stream or group went away while a read waited on it)
        as :class:`GroupMissing`; any other error as it is."""
        text = str(exc)  # Redis 6.2 wraps a script's errors: "ERR Error running script ...: NOGROUP ..."
        if "NOGROUP" not in text and not text.startswith("UNBLOCKED"):
            return exc
        return GroupMissing(
            f"the consumer group {self.group!r} of {self.keys.tasks!r} does not exist "
            "(was the stream deleted, or Redis restarted without persistence? Broker.setup() creates it)"
        )

    def _read_new(self, count: int, block_ms: int | None) -> list[Task]:
        streams: dict[Any, Any] = {self.keys.tasks: ">"}
        try:
            reply = self._redis.xreadgroup(self.group, self.consumer, streams, count=count, block=block_ms)
        except redis.ResponseError as exc:
            raise self._group_missing(exc) from exc
        screened = [(self._screen(_text(eid), fields, 1), fields) for eid, fields in _stream_entries(reply)]
        return self._admit_tasks([(task, fields) for task, fields in screened if task is not None])

    def _claim_entries(self, min_idle_ms: int, count: int, only: str = "", mine: bool = False) -> list[Task]:
        rows = self._run(
            self._claim,
            [self.keys.tasks],
            [self.group, self.consumer, min_idle_ms, self.max_deliveries, count, SCAN_LIMIT, only, "1" if mine else ""],
        )
        tasks: list[tuple[Task, dict[bytes, bytes]]] = []
        for kind, entry_id, deliveries, flat, owner in rows:
            fields, eid = _pairs(flat), _text(entry_id)
            if kind == b"dead":
                detail = f"delivered {deliveries} times (max_deliveries={self.max_deliveries}), last to {_text(owner)}"
                self._bury(eid, fields, "max deliveries", detail, deliveries, notify=self._authentic(fields))
                continue
            log.info("%s: claimed entry %s from %s (delivery %d)", self.keys.tasks, eid, _text(owner), deliveries)
            task = self._screen(eid, fields, int(deliveries))
            if task is not None:
                tasks.append((task, fields))
        return self._admit_tasks(tasks)

    def _authentic(self, fields: dict[bytes, bytes]) -> bool:
        """Whether the entry's fields may be trusted to name its client: signed by this key
        (protocol v2), or anything when this broker is insecure."""
        if self._signer is None:
            return True
        return fields.get(b"v") == PROTOCOL.encode() and self._signer.verify(
            fields.get(b"signature"), "task", *(fields.get(name, b"") for name in _SIGNED_TASK_FIELDS)
        )

    def _screen(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> Task | None:
        """The entry as a Task if it passes every check made before admission; else None,
        after dead-lettering it.  Nothing here decodes the payload.

        Order: protocol version, fields present, signature, codec, expiry
        format, this broker's memory of admitted ids.  The client is told
        (a ``dead`` result) only about an authentic task: the fields of a
        forged one are the forger's, and a ``dead`` result to the client and id
        it names would fail a genuine task still waiting or running.
        """
        version = fields.get(b"v")
        if version != PROTOCOL.encode():
            detail = (
                f"an entry of protocol v{_text(version)[:8] or '1'}; this host speaks v{PROTOCOL} (signed expiry): "
                "drain old entries with old hosts before upgrading, or submit them again"
            )
            self._bury(entry_id, fields, "unsupported protocol", detail, deliveries, notify=self._signer is None)
            return None
        problem = _missing(fields, (b"id", b"reply_to", b"codec", b"expires", b"payload"))
        if problem:
            self._bury(entry_id, fields, "malformed", problem, deliveries, notify=self._signer is None)
            return None
        if self._signer is not None:
            signature = fields.get(b"signature")
            signed = (fields[name] for name in _SIGNED_TASK_FIELDS)
            if not signature:
                self._bury(entry_id, fields, "bad signature", "the message is not signed", deliveries, notify=False)
                return None
            if not self._signer.verify(signature, "task", *signed):
                detail = "the signature does not match the message"
                self._bury(entry_id, fields, "bad signature", detail, deliveries, notify=False)
                return None
        try:
            codec_obj = get_codec(_text(fields[b"codec"]))
        except CodecError as exc:
            self._bury(entry_id, fields, "unknown codec", str(exc), deliveries, notify=True)
            return None
        if not accepts(self._codec, codec_obj):
            detail = (
                f"codec {codec_obj.name!r} can run code when decoded, and this consumer's codec is "
                f"{self._codec.name!r}: only a consumer configured with an object codec decodes one"
            )
            self._bury(entry_id, fields, "codec refused", detail, deliveries, notify=True)
            return None
        try:
            expires_at = int(fields[b"expires"]) / 1000
        except ValueError:
            detail = f"expires is not an integer (ms since the epoch): {fields[b'expires'][:40]!r}"
            self._bury(entry_id, fields, "malformed", detail, deliveries, notify=True)
            return None
        task_id = _text(fields[b"id"])
        if self._replayed_here(task_id, entry_id):
            detail = f"task {task_id!r} was already run by this consumer (as another entry, or completed)"
            self._bury(entry_id, fields, "replay", detail, deliveries, notify=False)
            return None
        try:
            submitted_at: float | None = float(fields.get(b"submitted_at", b""))
        except ValueError:
            submitted_at = None
        payload = fields[b"payload"]
        return Task(
            entry_id, task_id, _text(fields[b"reply_to"]), codec_obj.name, payload, deliveries, submitted_at, expires_at
        )

    def _admit_tasks(self, screened: list[tuple[Task, dict[bytes, bytes]]]) -> list[Task]:
        """The tasks the ADMIT script lets run (one round trip); replays and expired ones dead-lettered."""
        if not screened:
            return []
        args: list[Any] = []
        for task, _fields in screened:
            assert task.expires_at is not None
            args += [task.entry_id, int(task.expires_at * 1000)]
        verdicts = self._run(self._admit, [self.keys.dedup(t.task_id) for t, _ in screened], args)
        admitted: list[Task] = []
        for (task, fields), verdict in zip(screened, verdicts, strict=True):
            if verdict == b"ok":
                self._remember(task)
                admitted.append(task)
                continue
            if verdict == b"replay":
                detail = f"task {task.task_id!r} belongs to another entry: this one is a copy"
                self._bury(task.entry_id, fields, "replay", detail, task.deliveries, notify=False)
            else:
                assert task.expires_at is not None
                when = datetime.datetime.fromtimestamp(task.expires_at, datetime.UTC).isoformat(timespec="seconds")
                detail = f"expired at {when} (the signed expiry, by the Redis server's clock) before delivery {task.deliveries}"
                self._mark_done(task.task_id)
                self._bury(task.entry_id, fields, "expired", detail, task.deliveries, notify=True)
        return admitted

    def _remember(self, task: Task) -> None:
        assert task.expires_at is not None
        with self._seen_lock:
            seen = self._seen.get(task.task_id)
            self._seen[task.task_id] = (task.entry_id, task.expires_at, bool(seen and seen[2]))
            self._seen.move_to_end(task.task_id)
            horizon = time.time() - SEEN_SLACK_S
            while self._seen and (len(self._seen) > SEEN_LIMIT or next(iter(self._seen.values()))[1] < horizon):
                self._seen.popitem(last=False)

    def _mark_done(self, task_id: str) -> None:
        with self._seen_lock:
            seen = self._seen.get(task_id)
            if seen is not None:
                self._seen[task_id] = (seen[0], seen[1], True)

    def _replayed_here(self, task_id: str, entry_id: str) -> bool:
        """Whether this consumer admitted ``task_id`` as another entry, or answered it, before it expired."""
        with self._seen_lock:
            seen = self._seen.get(task_id)
        if seen is None or seen[1] < time.time() - SEEN_SLACK_S:
            return False
        return seen[0] != entry_id or seen[2]

    def _bury(
        self, entry_id: str, fields: dict[bytes, bytes], reason: str, detail: str, deliveries: int, *, notify: bool
    ) -> bool:
        """Dead-letter an entry this consumer owns; with ``notify``, tell its client (status ``dead``, JSON)."""
        task_id, reply_to = _text(fields.get(b"id")), _text(fields.get(b"reply_to"))
        log.warning("%s: dead-lettering entry %s (task %r): %s: %s", self.keys.tasks, entry_id, task_id, reason, detail)
        dead: list[Any] = [
            "reason", reason, "detail", detail, "entry", entry_id, "deliveries", deliveries,
            "consumer", self.consumer, "dead_at", f"{time.time():.6f}",
        ]  # fmt: skip
        result: list[Any] = []
        notify = notify and bool(reply_to) and bool(task_id)
        if notify:
            record = json.dumps({"reason": reason, "detail": detail, "deliveries": int(deliveries)}).encode()
            result = [*self._result_fields(task_id, DEAD, "json", record), "reason", reason, "entry", entry_id]
        result_key = self.keys.results(reply_to) if notify else self.keys.dead
        done = self._run(
            self._dead_letter,
            [self.keys.tasks, self.keys.dead, result_key],
            [self.group, self.consumer, entry_id, self.dead_maxlen, self.result_maxlen, self.result_ttl_s,
             len(dead), *dead, *result],
        )  # fmt: skip
        return bool(done)

    def _open_result(self, key: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Result:
        eid = _text(entry_id)
        task_id, status, codec = _text(fields.get(b"id")), _text(fields.get(b"status")), fields.get(b"codec", b"")
        payload = fields.get(b"payload", b"")
        reason = _text(fields[b"reason"]) if b"reason" in fields else None
        why, detail = "", ""
        try:
            codec_obj = get_codec(_text(codec))
        except CodecError as exc:
            why, detail = "unknown codec", str(exc)
        else:
            if self._signer is not None:
                signature = fields.get(b"signature")
                signed = (fields.get(name, b"") for name in (b"id", b"status", b"codec", b"payload"))
                if not signature:
                    why, detail = "bad signature", "the message is not signed"
                elif not self._signer.verify(signature, "result", *signed):
                    why, detail = "bad signature", "the signature does not match the message"
            if not why and not accepts(self._codec, codec_obj):
                why, detail = (
                    "codec refused",
                    f"codec {codec_obj.name!r} can run code; this client's is {self._codec.name!r}",
                )
        if why:
            log.warning("%s: rejecting result %s of task %r: %s: %s", key, eid, task_id, why, detail)
            return Result(eid, task_id, REJECTED, _text(codec), b"", why)
        return Result(eid, task_id, status, codec_obj.name, payload, reason)

    def _forget_gone_consumers(self) -> None:
        try:
            info: list[dict[str, Any]] = self._redis.xinfo_consumers(self.keys.tasks, self.group)
        except redis.ResponseError as exc:
            raise self._group_missing(exc) from exc
        gone = [
            _text(c["name"])
            for c in info
            if int(c["pending"]) == 0
            and int(c["idle"]) > self.lease_ms
            and _text(c["name"]) not in (self.consumer, RELEASED)
        ]
        if gone:
            self._run(self._forget, [self.keys.tasks, *map(self.keys.alive, gone)], [self.group, *gone])


#: The fields a task's signature covers, in order (after the kind, ``task``).
_SIGNED_TASK_FIELDS: Final = (b"id", b"reply_to", b"codec", b"expires", b"payload")


def _missing(fields: dict[bytes, bytes], names: Iterable[bytes]) -> str:
    absent = [n.decode() for n in names if not fields.get(n)]
    return f"missing field(s) {', '.join(absent)}" if absent else ""


def check_server_version(version: str, where: str = "the server") -> None:
    """Raise :class:`ServerTooOld` when ``version`` (``"7.0.15"``) is older than 6.2."""
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        raise ServerTooOld(f"cannot read the Redis version {version!r} of {where}") from None
    if parts < MIN_SERVER:
        raise ServerTooOld(
            f"Redis {version} at {where} is too old: prefork-redis needs Redis >= 6.2 "
            "(XPENDING IDLE, XAUTOCLAIM, exclusive stream ranges)"
        )
