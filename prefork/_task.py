"""The two records every strategy sees: a task (in the supervisor) and a worker."""

from __future__ import annotations

from typing import Any

import attrs


class Task:
    """One submitted call, as the supervisor tracks it until its one outcome.

    Sinks and facades read ``id``, ``method``, ``args``, ``kwargs``, ``context``
    and the timestamps; ``handle`` belongs to the result sink (a future, say).
    """

    __slots__ = (
        "args",
        "callback",
        "claimed",
        "context",
        "crashes",
        "done",
        "finished_at",
        "handle",
        "holder",
        "id",
        "kwargs",
        "method",
        "payload",
        "retries",
        "started_at",
        "submitted_at",
        "timeout",
    )

    def __init__(
        self,
        id: int,
        method: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
        context: Any = None,
        callback: Any = None,
    ) -> None:
        self.id = id
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.context = context
        self.callback = callback
        self.handle: Any = None
        self.payload: Any = b""  #: the serialized call: bytes, or a list of parts (large blobs unjoined)
        self.claimed = False  #: the sink's claim() said yes (once: a re-dispatch does not ask again)
        self.holder: Any = None  #: the worker that has it, while in flight (the ledger's key)
        self.retries = 0  #: re-dispatches after a worker died before starting it
        self.crashes = 0  #: workers that died while running it
        self.done = False
        self.submitted_at = 0.0
        self.started_at = 0.0
        self.finished_at = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds from the start in the worker to the result (0 if it never ran)."""
        if self.started_at and self.finished_at:
            return max(0.0, self.finished_at - self.started_at)
        return 0.0

    def __repr__(self) -> str:
        name = self.method if isinstance(self.method, str) else getattr(self.method, "__qualname__", repr(self.method))
        return f"<Task {self.id} {name}>"


@attrs.define
class WorkerInfo:
    """What hooks learn about a worker: its scoreboard slot, pid, pool name, serial."""

    slot: int
    name: str
    serial: int
    pid: int = 0
