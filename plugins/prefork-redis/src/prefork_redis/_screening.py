"""Before a task runs, and before a result is believed: screening, admission, dead letters.

The part of :class:`~prefork_redis.broker.Broker` that decides whether an
entry may run, in this order: protocol version, fields present, signature
(checked before anything is decoded), codec, expiry format, this broker's own
memory of the task ids it admitted (:meth:`Screening._screen`); then
admission in Redis, by the dedup key and the server's clock
(:data:`~prefork_redis._scripts.FETCH` looks first, read-only;
:data:`~prefork_redis._scripts.ADMIT` lets a signed entry take a task id
whose key is missing).  An entry that fails is dead-lettered by
:meth:`Screening._bury`, its client told only when the entry is authentic.
Results a client reads are checked by :meth:`Screening._open_result`.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import redis

from prefork_redis._link import Links, pairs, text
from prefork_redis.codec import PROTOCOL, Codec, Signer, accepts, get_codec
from prefork_redis.errors import BrokerError, CodecError, GroupMissing
from prefork_redis.records import DEAD, REJECTED, Keys, Result, Task

if TYPE_CHECKING:
    from redis.commands.core import Script

log = logging.getLogger("prefork_redis")

#: How many admitted task ids a broker remembers (oldest forgotten first), to refuse
#: replays even when the dedup key in Redis was deleted.
SEEN_LIMIT: Final = 100_000
#: A remembered task id is forgotten this long after it expired (clock skew between hosts and Redis).
SEEN_SLACK_S: Final = 300.0
#: The longest BLOCK a fetch or a read may ask for.
MAX_BLOCK_MS: Final = 60_000
#: The fields a task's signature covers, in order (after the kind, ``task``).
SIGNED_TASK_FIELDS: Final = (b"id", b"reply_to", b"codec", b"expires", b"payload")


def check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BrokerError(f"{name} must be a positive integer, not {value!r}")


def _missing(fields: dict[bytes, bytes], names: Iterable[bytes]) -> str:
    absent = [n.decode() for n in names if not fields.get(n)]
    return f"missing field(s) {', '.join(absent)}" if absent else ""


class Screening:
    """The checks of a broker (a base of :class:`~prefork_redis.broker.Broker`, which sets
    the attributes below), and the helpers every part of it uses."""

    __slots__ = ()

    keys: Keys
    group: str
    consumer: str
    max_deliveries: int
    dead_maxlen: int
    result_maxlen: int
    result_ttl_s: int
    _redis: Any  # the client the broker was given: its options
    _io: Links
    _codec: Codec
    _signer: Signer | None
    _seen: OrderedDict[str, tuple[str, float, bool]]
    _seen_lock: threading.Lock
    _admit: Script
    _dead_letter: Script

    def _where(self) -> str:
        if self._io.cluster:
            node = self._redis.get_default_node()
            return f"cluster {node.host}:{node.port}" if node is not None else "cluster"
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

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args, client=self._io.client())
        except redis.ResponseError as exc:
            raise self._group_missing(exc) from exc

    def _group_missing(self, exc: redis.ResponseError) -> Exception:
        """A NOGROUP error (or UNBLOCKED: the stream or group went away while a read waited on it)
        as :class:`GroupMissing`; any other error as it is."""
        message = str(exc)  # Redis 6.2 wraps a script's errors: "ERR Error running script ...: NOGROUP ..."
        if "NOGROUP" not in message and not message.startswith("UNBLOCKED"):
            return exc
        return GroupMissing(
            f"the consumer group {self.group!r} of {self.keys.tasks!r} does not exist "
            "(was the stream deleted, or Redis restarted without persistence? Broker.setup() creates it)"
        )

    def _result_fields(self, task_id: str, status: str, codec: str, payload: bytes) -> list[bytes | str]:
        tid = task_id.encode()
        fields: list[bytes | str] = ["id", tid, "status", status, "codec", codec, "payload", payload]
        if self._signer is not None:
            fields += ["signature", self._signer.sign("result", tid, status.encode(), codec.encode(), payload)]
        return fields

    def _take(self, rows: Sequence[Any]) -> list[Task]:
        """The tasks of FETCH's rows that pass screening and admission; the others dead-lettered."""
        admitted: list[Task] = []
        unclaimed: list[tuple[Task, dict[bytes, bytes]]] = []
        for kind, entry_id, deliveries, flat, owner, verdict in rows:
            fields, eid = pairs(flat), text(entry_id)
            if kind == b"dead":
                detail = f"delivered {deliveries} times (max_deliveries={self.max_deliveries}), last to {text(owner)}"
                self._bury(eid, fields, "max deliveries", detail, deliveries, notify=self._authentic(fields))
                continue
            if kind == b"task":
                log.info("%s: claimed entry %s from %s (delivery %d)", self.keys.tasks, eid, text(owner), deliveries)
            task = self._screen(eid, fields, int(deliveries))
            if task is None:
                continue
            if verdict == b"ok":
                self._remember(task)
                admitted.append(task)
            elif verdict in (b"replay", b"expired"):
                self._refuse(task, fields, verdict)
            else:  # no dedup key yet: only now that the signature is checked may it take one
                unclaimed.append((task, fields))
        return admitted + self._admit_tasks(unclaimed)



    def _authentic(self, fields: dict[bytes, bytes]) -> bool:
        """Whether the entry's fields may be trusted to name its client: signed by this key
        (protocol v2), or anything when this broker is insecure."""
        if self._signer is None:
            return True
        return fields.get(b"v") == PROTOCOL.encode() and self._signer.verify(
            fields.get(b"signature"), "task", *(fields.get(name, b"") for name in SIGNED_TASK_FIELDS)
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
                f"an entry of protocol v{text(version)[:8] or '1'}; this host speaks v{PROTOCOL} (signed expiry): "
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
            signed = (fields[name] for name in SIGNED_TASK_FIELDS)
            if not signature:
                self._bury(entry_id, fields, "bad signature", "the message is not signed", deliveries, notify=False)
                return None
            if not self._signer.verify(signature, "task", *signed):
                detail = "the signature does not match the message"
                self._bury(entry_id, fields, "bad signature", detail, deliveries, notify=False)
                return None
        try:
            codec_obj = get_codec(text(fields[b"codec"]))
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
        task_id = text(fields[b"id"])
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
            entry_id, task_id, text(fields[b"reply_to"]), codec_obj.name, payload, deliveries, submitted_at, expires_at
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
            else:
                self._refuse(task, fields, verdict)
        return admitted



    def _refuse(self, task: Task, fields: dict[bytes, bytes], verdict: bytes) -> None:
        """Dead-letter a task admission refused: a ``replay`` (unanswered) or ``expired`` (answered)."""
        if verdict == b"replay":
            detail = f"task {task.task_id!r} belongs to another entry: this one is a copy"
            self._bury(task.entry_id, fields, "replay", detail, task.deliveries, notify=False)
            return
        assert task.expires_at is not None
        when = datetime.datetime.fromtimestamp(task.expires_at, datetime.UTC).isoformat(timespec="seconds")
        detail = f"expired at {when} (the signed expiry, by the Redis server's clock) before delivery {task.deliveries}"
        self._mark_done(task.task_id)
        self._bury(task.entry_id, fields, "expired", detail, task.deliveries, notify=True)



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
        task_id, reply_to = text(fields.get(b"id")), text(fields.get(b"reply_to"))
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
        eid = text(entry_id)
        task_id, status, codec = text(fields.get(b"id")), text(fields.get(b"status")), fields.get(b"codec", b"")
        payload = fields.get(b"payload", b"")
        reason = text(fields[b"reason"]) if b"reason" in fields else None
        why, detail = "", ""
        try:
            codec_obj = get_codec(text(codec))
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
            return Result(eid, task_id, REJECTED, text(codec), b"", why)
        return Result(eid, task_id, status, codec_obj.name, payload, reason)


