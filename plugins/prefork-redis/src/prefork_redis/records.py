"""What travels: the keys of an app, a delivered :class:`Task`, a client's :class:`Result`."""

from __future__ import annotations

from typing import Any, Final

import attrs

from prefork_redis.codec import get_codec
from prefork_redis.errors import BadSignature, BrokerError

__all__ = ["DEAD", "ERROR", "OK", "REJECTED", "Keys", "Result", "Task"]

#: Result statuses.  ``ok``: the task's return value; ``error``: a description
#: of its failure, as the supervisor words it; ``dead``: dead-lettered
#: (``{"reason", "detail", "deliveries"}``, always JSON); ``rejected``: set by
#: :meth:`Broker.results` on a result whose signature did not verify.
OK: Final = "ok"
ERROR: Final = "error"
DEAD: Final = "dead"
REJECTED: Final = "rejected"


def check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or "{" in value or "}" in value:
        raise BrokerError(f"{what} must be a non-empty string without braces, not {value!r}")


def _app_name(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    check_name("the app name", value)


@attrs.frozen
class Keys:
    """The Redis keys of one app; ``{app}`` is the Cluster hash tag they share."""

    app: str = attrs.field(validator=_app_name)

    @property
    def prefix(self) -> str:
        return f"pf:{{{self.app}}}:"

    @property
    def tasks(self) -> str:
        """The task stream (one consumer group); never trimmed, entries are deleted when done."""
        return self.prefix + "tasks"

    @property
    def dead(self) -> str:
        """The dead-letter stream: the entry's fields plus reason, detail, deliveries, consumer."""
        return self.prefix + "dead"

    def dedup(self, task_id: str) -> str:
        """The entry that owns ``task_id``: set (NX, with a TTL) by the first submit,
        checked by every host before it runs the task (replays are refused), and kept
        at least until the task expires."""
        return f"{self.prefix}dedup:{task_id}"

    def results(self, client_id: str) -> str:
        """One client's result stream (MAXLEN ~, TTL refreshed on every publish)."""
        return f"{self.prefix}results:{client_id}"

    def alive(self, consumer: str) -> str:
        """A consumer's liveness key, refreshed by every renew; it expires when the consumer stops."""
        return f"{self.prefix}alive:{consumer}"


@attrs.frozen
class Task:
    """A task delivered to this consumer; its signature (if any) has been verified.

    ``deliveries`` counts this delivery: 1 the first time, more after
    reclaims.  ``payload`` is encoded with ``codec``; :meth:`decode` decodes it.
    ``expires_at`` (Unix time, seconds) is the signed instant after which no
    host starts it.
    """

    entry_id: str
    task_id: str
    reply_to: str
    codec: str
    payload: bytes = attrs.field(repr=False)
    deliveries: int
    submitted_at: float | None = None
    expires_at: float | None = None

    def decode(self) -> Any:
        """The submitted value."""
        return get_codec(self.codec).loads(self.payload)


@attrs.frozen
class Result:
    """One result read by a client: ``status`` is ``ok``, ``error``, ``dead`` or ``rejected``."""

    entry_id: str
    task_id: str
    status: str
    codec: str
    payload: bytes = attrs.field(repr=False)
    #: Why a result is ``dead`` or ``rejected``; None otherwise.
    reason: str | None = None

    def decode(self) -> Any:
        """The value: the return value (``ok``), the error (``error``), the dead-letter record (``dead``).

        Raises :class:`BadSignature` for a ``rejected`` result, which is never decoded.
        """
        if self.status == REJECTED:
            raise BadSignature(f"result {self.entry_id} of task {self.task_id!r} was rejected: {self.reason}")
        return get_codec(self.codec).loads(self.payload)
