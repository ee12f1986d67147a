"""The supervisor's side of the broker: fetch, renew, complete, release, reap.

One consumer of the app's group per supervisor.  Each step that depends on
owning an entry checks it inside a Lua script (:mod:`prefork_redis._scripts`),
so a consumer that lost an entry can neither renew it nor publish its result.
Round trips are what a busy host pays for, so each step that a host makes
per task takes many tasks in one: a fetch is one script (released entries,
new ones, a first look at admission), and waits (when nothing is there) in
one more round trip, a blocking ``XREAD`` with the same script pipelined
behind it; a batch of finished tasks is completed by one script.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import redis
from redis.exceptions import NoScriptError

from prefork_redis._link import pairs, text
from prefork_redis._screening import Screening, check_positive
from prefork_redis.codec import get_codec
from prefork_redis.errors import BrokerError, GroupMissing, ServerTooOld
from prefork_redis.records import ERROR, OK, Task

if TYPE_CHECKING:
    from redis.commands.core import Script

log = logging.getLogger("prefork_redis")

#: The consumer that holds released entries until someone claims them.  Real
#: consumer names contain two colons, so it cannot clash with one.
RELEASED: Final = "~released"
#: The oldest server with XAUTOCLAIM-era stream commands (XPENDING IDLE, exclusive ranges).
MIN_SERVER: Final = (6, 2)
#: How many pending entries one claim script looks at, at most.
SCAN_LIMIT: Final = 1000
#: The most tasks one script call submits or completes (a batch of more is sent as several calls).
SEND_BATCH: Final = 500


def consumer_name() -> str:
    """``host:pid:nonce``, unique per supervisor (the nonce tells restarts with a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


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


#: A task's answer, ready to publish: the task, its payload in the task's codec, its status.
Completion: TypeAlias = tuple[Task, bytes, str]


def _check_completions(done: Sequence[Completion]) -> None:
    for _task, payload, status in done:
        if status not in (OK, ERROR):
            raise BrokerError(f"a completion's status is 'ok' or 'error', not {status!r}")
        if not isinstance(payload, bytes):
            raise BrokerError(f"a completion's payload is bytes in the task's codec, not {type(payload).__name__}")


class Consumer(Screening):
    """The supervisor's calls of :class:`~prefork_redis.broker.Broker` (see there)."""

    __slots__ = ("_after", "_ready")

    lease_ms: int
    _after: str  # the id to wait after for new entries, when the last fetch took fewer than asked
    _ready: bool
    _fetch_script: Script
    _renew: Script
    _complete: Script
    _release: Script
    _claim: Script
    _forget: Script

    def setup(self) -> None:
        """Check the server, create the group (at id 0, so earlier submits count) and mark this consumer alive."""
        version = text(self._io.client().info("server").get("redis_version"))
        check_server_version(version, self._where())
        try:
            self._io.client().xgroup_create(self.keys.tasks, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._io.client().set(self.keys.alive(self.consumer), 0, px=self.lease_ms)
        self._ready = True
        self._after = ""

    def fetch(self, count: int, block_ms: int | None = 1000) -> list[Task]:
        """At most ``count`` tasks for this consumer: released ones first, then new ones.

        Waits up to ``block_ms`` (None: not at all) when there is none.  A task
        that fails authentication or admission (unsigned, forged, a replay,
        expired, an old protocol, an unknown or refused codec) is dead-lettered
        here and not returned; so fewer than ``count`` may come back even when
        more were waiting.
        """
        return self.exchange((), count, block_ms)[1]

    def exchange(
        self,
        done: Sequence[Completion],
        count: int,
        block_ms: int | None = 1000,
        *,
        before_wait: Callable[[], Sequence[Completion]] | None = None,
    ) -> tuple[list[bool], list[Task]]:
        """Complete ``done`` (as :meth:`complete_many`), then fetch (as :meth:`fetch`), in one
        round trip: a busy supervisor answers the tasks that finished and takes as many new
        ones at once.  Returns whether each completion was published, and the tasks.

        When the fetch is about to wait (nothing to take), ``before_wait()`` is called
        and what it returns is completed in the same round trip as the wait, ahead of it:
        a supervisor can route the answers that come while it waits elsewhere from then
        on.  A :class:`GroupMissing` with completions to publish is raised (they cannot
        be); without, the group is made again and the fetch repeated.
        """
        check_positive("count", count)
        self._check_block(block_ms)
        _check_completions(done)
        if not self._ready:
            self.setup()
        taken: list[Completion] = []  # what before_wait gave: completions too

        def waiting() -> Sequence[Completion]:
            more = list(before_wait()) if before_wait is not None else []
            taken.extend(more)
            return more

        try:
            return self._fetch(done, count, block_ms, waiting)
        except GroupMissing:
            log.warning("%s: the group %r was gone; creating it again", self.keys.tasks, self.group)
            self.setup()
            if done or taken:
                raise
            return self._fetch(done, count, block_ms, waiting)

    def _fetch(
        self,
        done: Sequence[Completion],
        count: int,
        block_ms: int | None,
        before_wait: Callable[[], Sequence[Completion]],
    ) -> tuple[list[bool], list[Task]]:
        """Completions and the FETCH script in one round trip; and when it found nothing
        and ``block_ms`` allows, one more that waits: XREAD BLOCK for an entry newer than
        the newest one the script saw, with FETCH pipelined behind it (Redis runs it as soon
        as the read returns), so a task that arrives is fetched and admitted at once.

        When the last fetch took fewer than it asked for (nothing new was left) and
        this consumer released nothing since, a blocking fetch starts with the wait."""
        args = [self.group, self.consumer, count, self.max_deliveries, RELEASED, SCAN_LIMIT, self.keys.dedup("")]
        fetch = ("EVALSHA", self._fetch_script.sha, 1, self.keys.tasks, *args)
        published: list[bool] = []
        after = self._after if block_ms is not None else ""
        if not after:
            batches = self._completion_batches(done)
            replies = self._io.pipeline(*(("EVALSHA", self._complete.sha, *c) for _, c in batches), fetch)
            published += self._published(batches, replies[:-1])
            reply = self._script_reply(replies[-1], self._fetch_script, [self.keys.tasks], args)
            self._after = after = text(reply[0])
            if len(reply) > 1 or block_ms is None:
                return published, self._take(reply[1:])
            done = ()
        done = [*done, *before_wait()]
        _check_completions(done)
        batches = self._completion_batches(done)
        wait = ("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", self.keys.tasks, after)
        replies = self._io.pipeline(*(("EVALSHA", self._complete.sha, *c) for _, c in batches), wait, fetch)
        published += self._published(batches, replies[:-2])
        self._after = ""
        if isinstance(replies[-2], Exception):
            raise self._failed(replies[-2])
        reply = self._script_reply(replies[-1], self._fetch_script, [self.keys.tasks], args)
        self._after = text(reply[0])
        return published, self._take(reply[1:])

    def _script_reply(self, reply: Any, script: Script, keys: list[str], args: list[Any]) -> Any:
        """A script's reply from a pipeline: run again alone when the script cache was
        flushed meanwhile (NOSCRIPT: it did not run), an error raised as one."""
        if isinstance(reply, NoScriptError):
            return self._run(script, keys, args)
        if isinstance(reply, Exception):
            raise self._failed(reply)
        return reply

    def _failed(self, exc: Exception) -> Exception:
        self._after = ""
        return self._group_missing(exc) if isinstance(exc, redis.ResponseError) else exc

    def _completion_batches(self, done: Sequence[Completion]) -> list[tuple[Sequence[Completion], list[Any]]]:
        """The COMPLETE script's calls for ``done``: ``(batch, [numkeys, keys..., args...])`` each."""
        out: list[tuple[Sequence[Completion], list[Any]]] = []
        for start in range(0, len(done), SEND_BATCH):
            batch = done[start : start + SEND_BATCH]
            args: list[Any] = [self.group, self.consumer, self.result_maxlen, self.result_ttl_s]
            for task, payload, status in batch:
                fields = self._result_fields(task.task_id, status, task.codec, payload)
                fields += ["entry", task.entry_id, "consumer", self.consumer]
                args += [task.entry_id, len(fields), *fields]
            keys = [self.keys.tasks, *(self.keys.results(task.reply_to) for task, _, _ in batch)]
            out.append((batch, [len(keys), *keys, *args]))
        return out

    def _published(self, batches: list[tuple[Sequence[Completion], list[Any]]], replies: Sequence[Any]) -> list[bool]:
        out: list[bool] = []
        for (batch, call), reply in zip(batches, replies, strict=True):
            answers = self._script_reply(reply, self._complete, call[1 : 1 + call[0]], call[1 + call[0] :])
            for (task, _, _), answer in zip(batch, answers, strict=True):
                if answer:  # answered: never again here.  A fenced run was not: its entry may come back, released
                    self._mark_done(task.task_id)
                out.append(bool(answer))
        return out

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
        return [text(i) for i in lost]

    def complete(self, task: Task, result: Any, *, status: str = OK, encoded: bool = False) -> bool:
        """Publish ``result`` to the task's client, then ack and delete the entry: the ack point.

        Returns False, publishing nothing, when this consumer no longer owns
        the entry (its lease was lost, or an earlier call whose reply was lost
        completed it): a result is published at most once per entry.
        ``status`` is ``ok`` or ``error``.  The result is encoded with the
        task's codec (``encoded=True``: it already is, as bytes); an encoding
        error is raised before anything is published.
        """
        return self.complete_many([(task, self.encode_result(task, result, encoded=encoded), status)])[0]

    def encode_result(self, task: Task, result: Any, *, encoded: bool = False) -> bytes:
        """``result`` in the task's codec, as :meth:`complete_many` takes it (``encoded=True``:
        bytes already in that codec, checked to be bytes); raises what the codec raises."""
        return self._encode(result, encoded, get_codec(task.codec))

    def complete_many(self, done: Sequence[Completion]) -> list[bool]:
        """Complete many tasks in one round trip (one script call per :data:`SEND_BATCH`):
        each ``(task, payload, status)``, the payload already in the task's codec
        (:meth:`encode_result`).  For each, as :meth:`complete`: True when published,
        acked and deleted; False, publishing nothing, when this consumer no longer owns
        the entry."""
        _check_completions(done)
        batches = self._completion_batches(done)
        if not batches:
            return []
        return self._published(batches, self._io.pipeline(*(("EVALSHA", self._complete.sha, *c) for _, c in batches)))

    def release(self, entry_id: str) -> bool:
        """Give back an entry this consumer cannot finish (its worker died): the next fetch or
        reap of any consumer takes it, with no lease to wait out.

        The delivery count is not changed: the next claim counts the next
        delivery, so a task that kills every worker it meets is dead-lettered
        after ``max_deliveries``.  Returns False when the entry was not this
        consumer's any more.
        """
        self._after = ""  # the next fetch looks for released entries before it waits
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
        self._io.client().delete(self.keys.alive(self.consumer))
        self._run(self._forget, [self.keys.tasks, self.keys.alive(self.consumer)], [self.group, self.consumer])
        self._ready = False

    def consumers(self) -> dict[str, tuple[bool, int]]:
        """Each consumer of the group: (alive key present, entries held)."""
        info: list[dict[str, Any]] = self._io.client().xinfo_consumers(self.keys.tasks, self.group)
        names = [text(c["name"]) for c in info]
        alive = [bool(self._io.client().exists(self.keys.alive(n))) for n in names]
        return {n: (a, int(c["pending"])) for n, a, c in zip(names, alive, info, strict=True)}

    def _claim_entries(self, min_idle_ms: int, count: int, only: str = "", mine: bool = False) -> list[Task]:
        rows = self._run(
            self._claim,
            [self.keys.tasks],
            [self.group, self.consumer, min_idle_ms, self.max_deliveries, count, SCAN_LIMIT, only, "1" if mine else ""],
        )
        tasks: list[tuple[Task, dict[bytes, bytes]]] = []
        for kind, entry_id, deliveries, flat, owner in rows:
            fields, eid = pairs(flat), text(entry_id)
            if kind == b"dead":
                detail = f"delivered {deliveries} times (max_deliveries={self.max_deliveries}), last to {text(owner)}"
                self._bury(eid, fields, "max deliveries", detail, deliveries, notify=self._authentic(fields))
                continue
            log.info("%s: claimed entry %s from %s (delivery %d)", self.keys.tasks, eid, text(owner), deliveries)
            task = self._screen(eid, fields, int(deliveries))
            if task is not None:
                tasks.append((task, fields))
        return self._admit_tasks(tasks)

    def _forget_gone_consumers(self) -> None:
        try:
            info: list[dict[str, Any]] = self._io.client().xinfo_consumers(self.keys.tasks, self.group)
        except redis.ResponseError as exc:
            raise self._group_missing(exc) from exc
        gone = [
            text(c["name"])
            for c in info
            if int(c["pending"]) == 0
            and int(c["idle"]) > self.lease_ms
            and text(c["name"]) not in (self.consumer, RELEASED)
        ]
        if gone:
            self._run(self._forget, [self.keys.tasks, *map(self.keys.alive, gone)], [self.group, *gone])
