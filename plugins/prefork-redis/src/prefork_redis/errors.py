"""The exceptions prefork-redis raises: one small tree under :class:`BrokerError`."""

from __future__ import annotations

from prefork.errors import PreforkError

__all__ = ["BadSignature", "BrokerError", "BrokerUnavailable", "CodecError", "GroupMissing", "ServerTooOld", "TaskLost"]


class BrokerError(PreforkError):
    """The broker cannot do what was asked; the message says what is wrong."""


class ServerTooOld(BrokerError):
    """The Redis server lacks commands the protocol needs (Redis >= 6.2)."""


class GroupMissing(BrokerError):
    """The consumer group (or the whole task stream) was deleted; :meth:`Broker.setup` recreates it."""


class CodecError(BrokerError, ValueError):
    """A codec is unknown, not installed, or not allowed without an HMAC key."""


class BadSignature(BrokerError):
    """A message's HMAC signature is missing or wrong; it was not decoded."""


class TaskLost(BrokerError):
    """Redis lost the task's records (a restart without persistence, a flush): it will
    not start again, though it may have run, in part or whole, before the loss."""


class BrokerUnavailable(BrokerError):
    """Redis stayed unreachable for longer than the client's ``broker_timeout``: the
    task's outcome is unknown (it may still run once Redis answers again)."""
