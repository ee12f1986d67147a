"""The exceptions prefork-redis raises: one small tree under :class:`BrokerError`."""

from __future__ import annotations

from prefork.errors import PreforkError

__all__ = ["BadSignature", "BrokerError", "CodecError", "GroupMissing", "ServerTooOld"]


class BrokerError(PreforkError):
    """The broker cannot do what was asked; the message says what is wrong."""


class ServerTooOld(BrokerError):
    """The Redis server lacks commands protocol v1 needs (Redis >= 6.2)."""


class GroupMissing(BrokerError):
    """The consumer group (or the whole task stream) was deleted; :meth:`Broker.setup` recreates it."""


class CodecError(BrokerError, ValueError):
    """A codec is unknown, not installed, or not allowed without an HMAC key."""


class BadSignature(BrokerError):
    """A message's HMAC signature is missing or wrong; it was not decoded."""
