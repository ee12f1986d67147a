"""A tiny TOML emitter: :meth:`prefork.config.Config.to_toml` writes a whole
configuration with it, and the generated reference its defaults.  A value TOML
cannot express raises :class:`Unrepresentable`; :func:`toml_assign` turns that
into a comment saying so.  Re-exported by :mod:`prefork.config.model`.
"""

from __future__ import annotations

import datetime
import math
import re
import sys
import types
from collections.abc import Mapping
from typing import Any

__all__ = ["Unrepresentable", "import_path", "toml_assign", "toml_key", "toml_string", "toml_value"]


class Unrepresentable(ValueError):
    """The value has no TOML form."""


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def import_path(obj: Any) -> str | None:
    """``"module:qualname"`` when importing that finds ``obj`` itself again, else ``None``."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module_name}:{qualname}" if found is obj else None


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (inline tables for mappings); :class:`Unrepresentable` if none."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(float(value))
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise Unrepresentable(value)
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if callable(value) or isinstance(value, types.ModuleType):
        path = import_path(value)
        if path is not None:
            return toml_string(path)
    raise Unrepresentable(value)


def toml_assign(key: str, value: Any) -> str:
    """``key = value``, or a comment saying why ``value`` cannot be written."""
    try:
        return f"{toml_key(key)} = {toml_value(value)}"
    except Unrepresentable:
        what = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"# {toml_key(key)}: a {type(value).__name__} ({what}) that TOML cannot express; set it from code"
