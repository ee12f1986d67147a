"""Process titles through setproctitle, quietly absent where it is not installed."""

from __future__ import annotations

try:
    from setproctitle import setproctitle as _set
except ImportError:  # pragma: no cover - setproctitle is a dependency
    _set = None


def set_title(title: str) -> None:
    if _set is not None:
        _set(title)
