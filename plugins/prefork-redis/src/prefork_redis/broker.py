"""The broker: protocol v1 of prefork's Redis Streams transport.

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
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import redis

from prefork_redis import _scripts
from prefork_redis.codec import Codec, Signer, get_codec, require_signer
from prefork_redis.errors import BrokerError, CodecError, GroupMissing, ServerTooOld
from prefork_redis.records import DEAD, ERROR, OK, REJECTED, Keys, Result, Task, check_name

if TYPE_CHECKING:
    from redis.commands.core import Script

__all__ = ["RELEASED", "Broker", "check_server_version", "consumer_name"]

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
    results; a supervisor decodes each task with the codec the task names.
    ``secret`` (or ``$PREFORK_REDIS_SECRET``) is the HMAC key: with a key,
    every message is signed and every received message must carry a valid
    signature; without one, ``pickle`` and ``cloudpickle`` are refused.

    Creating a broker does no I/O.  A supervisor calls :meth:`setup` once
    (the first :meth:`fetch` or :meth:`reap` does it otherwise).
    """

    __slots__ = (
        "_claim",
        "_codec",
        "_complete",
        "_dead_letter",
        "_forget",
        "_ready",
        "_redis",
        "_release",
        "_renew",
        "_signer",
        "_submit",
        "consumer",
        "dead_maxlen",
        "dedup_ttl_s",
        "group",
        "keys",
        "lease_ms",
        "max_deliveries",
        "result_maxlen",
        "result_ttl_s",
    )

    def __init__(
        self,
        client: redis.Redis,
        app: str,
        *,
        codec: str = "json",
        secret: str | bytes | None = None,
        group: str = "workers",
        consumer: str | None = None,
        lease_ms: int = 30_000,
        max_deliveries: int = 5,
        result_maxlen: int = 10_000,
        result_ttl_s: int = 86_400,
        dead_maxlen: int = 100_000,
        dedup_ttl_s: int = 86_400,
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
        for name, value in (
            ("lease_ms", lease_ms),
            ("max_deliveries", max_deliveries),
            ("result_maxlen", result_maxlen),
            ("result_ttl_s", result_ttl_s),
            ("dead_maxlen", dead_maxlen),
            ("dedup_ttl_s", dedup_ttl_s),
        ):
            _check_positive(name, value)
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
        self._ready = False
        # register_script only hashes the source; the script is loaded on first use.
        self._submit = client.register_script(_scripts.SUBMIT)
        self._renew = client.register_script(_scripts.RENEW)
        self._complete = client.register_script(_scripts.COMPLETE)
        self._release = client.register_script(_scripts.RELEASE)
        self._claim = client.register_script(_scripts.CLAIM)
        self._dead_letter = client.register_script(_scripts.DEAD_LETTER)
        self._forget = client.register_script(_scripts.FORGET)

    @classmethod
    def from_url(cls, url: str, app: str, **options: Any) -> Broker:
        """A broker on a new client for ``url`` (``redis://host:port/db``), with a 10 s socket timeout."""
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        return cls(client, app, **options)

    def __repr__(self) -> str:
        return f"Broker(app={self.keys.app!r}, group={self.group!r}, consumer={self.consumer!r}, codec={self._codec.name!r})"

    @property
    def codec(self) -> str:
        return self._codec.name

    # -- client side --------------------------------------------------------------

    def submit(self, task_id: str, value: Any, reply_to: str, *, encoded: bool = False) -> str | None:
        """Queue ``value`` as task ``task_id``; results go to client ``reply_to``.

        Returns the entry id, or None when ``task_id`` was submitted before
        (within ``dedup_ttl_s``): it is not queued twice.  ``encoded=True``
        means ``value`` is already bytes in this broker's codec.
        """
        if not task_id or not isinstance(task_id, str):
            raise BrokerError(f"a task id must be a non-empty string, not {task_id!r}")
        if not reply_to or not isinstance(reply_to, str):
            raise BrokerError(f"reply_to must be a client id (a non-empty string), not {reply_to!r}")
        payload = self._encode(value, encoded)
        tid, to, codec = task_id.encode(), reply_to.encode(), self._codec.name.encode()
        fields: list[bytes | str] = [
            "id", tid, "payload", payload, "reply_to", to, "codec", codec, "submitted_at", f"{time.time():.6f}",
        ]  # fmt: skip
        if self._signer is not None:
            fields += ["signature", self._signer.sign("task", tid, to, codec, payload)]
        entry_id = self._run(self._submit, [self.keys.dedup(task_id), self.keys.tasks], [self.dedup_ttl_s, *fields])
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
        last ``entry_id`` seen.  A result whose signature does not verify comes
        back with status ``rejected`` and is never decoded.
        """
        _check_positive("count", count)
        self._check_block(block_ms)
        key = self.keys.results(client_id)
        reply = self._redis.xread({key: last_id}, count=count, block=block_ms)
        out = [self._open_result(key, entry_id, fields) for entry_id, fields in _stream_entries(reply)]
        if delete and out:
            self._redis.xdel(key, *(r.entry_id for r in out))
        return out

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
        whose signature does not verify, or that names an unknown codec, is
        dead-lettered here and not returned; so fewer than ``count`` may come
        back even when more were waiting.
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
        the entry (its lease was lost): a result is published at most once per
        entry.  ``status`` is ``ok`` or ``error``.  The result is encoded with
        the task's codec (``encoded=True``: it already is, as bytes); an
        encoding error is raised before anything is published.
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
        """Claim up to ``count`` entries other consumers have not renewed for ``lease_ms``
        (default: this broker's), and released ones; return them to run.

        Entries already delivered ``max_deliveries`` times are dead-lettered
        instead (not counted in ``count``, so ``count=0`` only dead-letters).
        Consumers whose alive key expired and that hold nothing are removed
        from the group.
        """
        if not isinstance(count, int) or count < 0:
            raise BrokerError(f"count must be an integer >= 0, not {count!r}")
        if not self._ready:
            self.setup()
        try:
            tasks = self._claim_entries(min_idle_ms=self.lease_ms if lease_ms is None else lease_ms, count=count)
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
        """A NOGROUP error as :class:`GroupMissing`; any other error as it is."""
        if "NOGROUP" not in str(exc):
            return exc
        return GroupMissing(
            f"the consumer group {self.group!r} of {self.keys.tasks!r} does not exist "
            "(was the stream deleted? Broker.setup() creates it)"
        )

    def _read_new(self, count: int, block_ms: int | None) -> list[Task]:
        streams: dict[Any, Any] = {self.keys.tasks: ">"}
        try:
            reply = self._redis.xreadgroup(self.group, self.consumer, streams, count=count, block=block_ms)
        except redis.ResponseError as exc:
            raise self._group_missing(exc) from exc
        tasks = (self._accept(_text(eid), fields, 1) for eid, fields in _stream_entries(reply))
        return [t for t in tasks if t is not None]

    def _claim_entries(self, min_idle_ms: int, count: int, only: str = "") -> list[Task]:
        rows = self._run(
            self._claim,
            [self.keys.tasks],
            [self.group, self.consumer, min_idle_ms, self.max_deliveries, count, SCAN_LIMIT, only],
        )
        tasks: list[Task] = []
        for kind, entry_id, deliveries, flat, owner in rows:
            fields, eid = _pairs(flat), _text(entry_id)
            if kind == b"dead":
                detail = f"delivered {deliveries} times (max_deliveries={self.max_deliveries}), last to {_text(owner)}"
                self._bury(eid, fields, "max deliveries", detail, deliveries)
                continue
            log.info("%s: claimed entry %s from %s (delivery %d)", self.keys.tasks, eid, _text(owner), deliveries)
            task = self._accept(eid, fields, int(deliveries))
            if task is not None:
                tasks.append(task)
        return tasks

    def _accept(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> Task | None:
        """The entry as a Task, or None after dead-lettering it (bad signature, unknown codec, malformed)."""
        task_id, reply_to = _text(fields.get(b"id")), _text(fields.get(b"reply_to"))
        codec, payload = fields.get(b"codec", b""), fields.get(b"payload")
        problem = _missing(fields, (b"id", b"reply_to", b"codec", b"payload"))
        if problem:
            self._bury(entry_id, fields, "malformed", problem, deliveries)
            return None
        assert payload is not None
        try:
            codec_obj = get_codec(_text(codec))
        except CodecError as exc:
            self._bury(entry_id, fields, "unknown codec", str(exc), deliveries)
            return None
        detail = self._signature_problem(codec_obj, fields, "task", b"id", b"reply_to", b"codec", b"payload")
        if detail:
            self._bury(entry_id, fields, "bad signature", detail, deliveries)
            return None
        try:
            submitted_at: float | None = float(fields.get(b"submitted_at", b""))
        except ValueError:
            submitted_at = None
        return Task(entry_id, task_id, reply_to, codec_obj.name, payload, deliveries, submitted_at)

    def _signature_problem(self, codec: Codec, fields: dict[bytes, bytes], kind: str, *signed: bytes) -> str:
        """Why a message may not be decoded ('' when it may): the signature rule, checked before any decoding.

        Plain data without a key needs no signature.  With a key every message
        must carry this key's signature of the ``signed`` fields; a pickle
        codec without a key cannot be verified, so it is refused.
        """
        if self._signer is None:
            if not codec.objects:
                return ""
            return f"codec {codec.name!r} needs an HMAC key to verify it and this broker has none"
        signature = fields.get(b"signature")
        if not signature:
            return "the message is not signed"
        if not self._signer.verify(signature, kind, *(fields.get(name, b"") for name in signed)):
            return "the signature does not match the message"
        return ""

    def _bury(self, entry_id: str, fields: dict[bytes, bytes], reason: str, detail: str, deliveries: int) -> bool:
        """Dead-letter an entry this consumer owns, and tell its client (status ``dead``, JSON)."""
        task_id, reply_to = _text(fields.get(b"id")), _text(fields.get(b"reply_to"))
        log.warning("%s: dead-lettering entry %s (task %r): %s: %s", self.keys.tasks, entry_id, task_id, reason, detail)
        dead: list[Any] = [
            "reason", reason, "detail", detail, "entry", entry_id, "deliveries", deliveries,
            "consumer", self.consumer, "dead_at", f"{time.time():.6f}",
        ]  # fmt: skip
        result: list[Any] = []
        if reply_to:
            record = json.dumps({"reason": reason, "detail": detail, "deliveries": int(deliveries)}).encode()
            result = [*self._result_fields(task_id, DEAD, "json", record), "reason", reason, "entry", entry_id]
        result_key = self.keys.results(reply_to) if reply_to else self.keys.dead
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
        try:
            codec_obj = get_codec(_text(codec))
        except CodecError as exc:
            why, detail = "unknown codec", str(exc)
        else:
            detail = self._signature_problem(codec_obj, fields, "result", b"id", b"status", b"codec", b"payload")
            why = "bad signature" if detail else ""
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
