"""Process titles through setproctitle: what ``ps`` and ``top`` show of each process."""

from __future__ import annotations

from typing import Any

from setproctitle import setproctitle


def set_title(title: str) -> None:
    setproctitle(title)


class TaskTitle:
    """A task worker's title: ``base`` while idle, ``base busy module:function``
    while it runs a task (set only when it changes: a batch of one method's tasks
    costs two title changes, not one per task)."""

    __slots__ = ("base", "shown")

    def __init__(self, base: str) -> None:
        self.base = base
        self.shown = base

    def busy(self, method: Any) -> None:
        if isinstance(method, str):
            name = method
        else:
            target = getattr(method, "func", method)  # functools.partial
            name = f"{getattr(target, '__module__', None) or '?'}:{getattr(target, '__qualname__', None) or type(target).__qualname__}"
        title = f"{self.base} busy {name}"
        if title != self.shown:
            setproctitle(title)
            self.shown = title

    def idle(self) -> None:
        if self.shown != self.base:
            setproctitle(self.base)
            self.shown = self.base
