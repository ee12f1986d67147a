"""The optional members of the five strategy protocols, their defaults, and the
one place the core reads them.

A strategy needs only what its protocol requires (``prefork.strategies.registry.REQUIRED``);
each member below may be left out, and then its default applies.  The core
never probes a strategy for anything else: it calls these functions, which
are typed, so ``mypy --strict`` checks what the core does with each answer.
Registration checks the type of every optional member a class declares
(:func:`check`), so a wrong one fails at load with its name, not in a worker.

======================  ==========  ===============================================  ==================
kind                    member      what it is                                       default
======================  ==========  ===============================================  ==================
scaling                 resized     ``resized(delta, limit) -> policy``: ``delta``   cannot be resized
                                    more workers (``prefork ctl NAME add N``)
scaling                 evolve      ``evolve(**changes) -> policy``: options         ``attrs.evolve``
                                    changed at run time (``update_policy``)          for attrs classes
transport               max_frame   ``int``: the longest frame it carries (bytes)    ``0``: no limit
serializer              takes_buf\\  ``bool``: ``loads`` accepts memoryviews          ``False``: bytes
                        fers
serializer              dumps_parts ``dumps_parts(obj) -> list`` of parts sent       ``[dumps(obj)]``
                                    one after the other (large blobs unjoined)
sink                    close       ``close()``: once, after the last delivery       nothing
sink                    cancel_run\\ ``bool``: a running task can be cancelled; the  ``False``
                        ning        core then sets ``sink.killer`` to a function
                                    that kills its worker, and sends one task at a
                                    time per worker
======================  ==========  ===============================================  ==================

A worker's channel (``Transport.child_channel``) may have ``send_parts(parts)``
(send one frame given as parts); without it a frame is joined and ``send``\\ t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from prefork.errors import PluginError

#: optional members by kind: (name, what its value must be, as a check and as words)
_CALLABLE: Final = (callable, "a method")
_BOOL: Final = (lambda v: isinstance(v, bool), "a bool")
_SIZE: Final = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0")
OPTIONAL: Final[dict[str, dict[str, tuple[Callable[[Any], bool], str]]]] = {
    "scaling": {"resized": _CALLABLE, "evolve": _CALLABLE},
    "transport": {"max_frame": _SIZE},
    "serializer": {"takes_buffers": _BOOL, "dumps_parts": _CALLABLE},
    "resolver": {},
    "sink": {"close": _CALLABLE, "cancel_running": _BOOL},
}


def check(kind: str, obj: Any, label: str) -> None:
    """A :class:`PluginError` naming the first optional member of ``obj`` (a class or an
    instance) whose value is of the wrong type.  Members set per instance (an attrs
    field) are checked on the instance only."""
    for member, (ok, words) in OPTIONAL.get(kind, {}).items():
        if not hasattr(obj, member):
            continue
        value = getattr(obj, member)
        if isinstance(obj, type) and not callable(value) and words != "a method" and not _is_value(value):
            continue  # a descriptor (an attrs field, a property): looked at on the instance
        if not ok(value):
            raise PluginError(f"{kind} {label}: `{member}` must be {words}, not {value!r} (see prefork.strategies.optional)")


def _is_value(value: Any) -> bool:
    return isinstance(value, bool | int | float | str | bytes | type(None))


def max_frame(transport: Any) -> int:
    value = getattr(transport, "max_frame", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def takes_buffers(serializer: Any) -> bool:
    return getattr(serializer, "takes_buffers", False) is True


def dumps_parts(serializer: Any) -> Callable[[Any], list[Any]] | None:
    parts = getattr(serializer, "dumps_parts", None)
    return parts if callable(parts) else None


def sink_close(sink: Any) -> Callable[[], object] | None:
    close = getattr(sink, "close", None)
    return close if callable(close) else None


def cancels_running(sink: Any) -> bool:
    return getattr(sink, "cancel_running", False) is True


def resized(policy: Any) -> Callable[[int, int], Any] | None:
    fn = getattr(policy, "resized", None)
    return fn if callable(fn) else None


def evolve(policy: Any) -> Callable[..., Any] | None:
    fn = getattr(policy, "evolve", None)
    return fn if callable(fn) else None


def send_parts(channel: Any) -> Callable[[list[Any]], object] | None:
    fn = getattr(channel, "send_parts", None)
    return fn if callable(fn) else None


__all__ = [
    "OPTIONAL", "cancels_running", "check", "dumps_parts", "evolve", "max_frame", "resized", "send_parts",
    "sink_close", "takes_buffers",
]
