"""Process titles through setproctitle, quietly absent where it is not installed."""

from __future__ import annotations

from setproctitle import setproctitle


def set_title(title: str) -> None:
    setproctitle(title)
