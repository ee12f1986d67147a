"""Where in an object graph serialization fails: ``args[1]['db'].conn._lock``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MAX_DEPTH = 8
_MAX_ITEMS = 200


def find_unserializable(obj: Any, dumps: Callable[[Any], bytes], path: str) -> str | None:
    """The path of the innermost part of ``obj`` that ``dumps`` refuses, or ``None``.

    Walks tuples, lists, sets, dict values and instance attributes, at most
    ``_MAX_DEPTH`` levels deep; best effort, never raises.
    """
    try:
        dumps(obj)
    except Exception:
        pass
    else:
        return None
    return _descend(obj, dumps, path, 0) or path


def _descend(obj: Any, dumps: Callable[[Any], bytes], path: str, depth: int) -> str | None:
    if depth >= _MAX_DEPTH:
        return None
    for sub_path, child in _children(obj, path):
        try:
            dumps(child)
        except Exception:
            return _descend(child, dumps, sub_path, depth + 1) or sub_path
    return None


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(obj, (str, bytes, bytearray, int, float, complex, bool, type(None))):
        return []
    if isinstance(obj, dict):
        return [(f"{path}[{k!r}]", v) for k, v in list(obj.items())[:_MAX_ITEMS]]
    if isinstance(obj, (list, tuple)):
        return [(f"{path}[{i}]", v) for i, v in enumerate(obj[:_MAX_ITEMS])]
    if isinstance(obj, (set, frozenset)):
        return [(f"{path}{{item}}", v) for v in list(obj)[:_MAX_ITEMS]]
    try:
        attrs = vars(obj)
    except TypeError:
        return []
    return [(f"{path}.{name}", value) for name, value in list(attrs.items())[:_MAX_ITEMS]]
