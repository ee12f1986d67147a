"""The value checks of the configuration model: validators and converters for
attrs fields, each raising :class:`prefork.errors.OptionError` (key, value,
reason), and the helpers the loader uses to judge one value (:func:`check_field`)
and to make what it read read-only (:func:`freeze`).  :mod:`prefork.config.model`
builds its tables from them and re-exports what the loader imports.
"""

from __future__ import annotations

import math
import re
import signal
import types
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from prefork.errors import OptionError
from prefork.strategies.registry import KINDS, did_you_mean

__all__ = [
    "ImportPathCheck",
    "Validator",
    "as_float",
    "as_tuple",
    "boolean",
    "callable_spec",
    "check_field",
    "choice",
    "doc",
    "freeze",
    "frozen_mapping",
    "host_port",
    "int_ge",
    "is_int",
    "is_list",
    "is_number",
    "nonempty_str",
    "plugin_list",
    "read_only",
    "seconds",
    "signal_map",
    "strategy_kind",
    "string",
    "title_template",
]

_CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: An attrs validator: ``check(instance, attribute, value)``, raising :class:`OptionError`.
Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def int_ge(minimum: int) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_int(value):
            raise OptionError(attribute.name, value, "must be an integer")
        if value < minimum:
            raise OptionError(attribute.name, value, f"must be >= {minimum}")

    return check


def as_float(value: Any) -> Any:
    """An int becomes a float; anything else is left for the validator to judge."""
    if is_int(value):
        try:
            return float(value)
        except OverflowError:
            return value
    return value


def seconds(minimum: float, *, strict: bool = False) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_number(value):
            raise OptionError(attribute.name, value, "must be a number")
        if not isinstance(value, float) or not math.isfinite(value):
            raise OptionError(attribute.name, value, "must be a finite number")
        if strict and value <= minimum:
            raise OptionError(attribute.name, value, f"must be > {minimum:g}")
        if value < minimum:
            raise OptionError(attribute.name, value, f"must be >= {minimum:g}")

    return check


def choice(choices: tuple[str, ...]) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            hint = did_you_mean(value, list(choices)) if isinstance(value, str) else ""
            raise OptionError(attribute.name, value, f"must be {' or '.join(map(repr, choices))}{hint}")

    return check


def title_template(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(attribute.name, value, "must be a non-empty string")
    try:
        value.format(name="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise OptionError(attribute.name, value, f"must be a title with at most the field {{name}} ({exc!r})") from None


def string(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise OptionError(attribute.name, value, "must be a string")


def host_port(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    _, sep, port = str(value).rpartition(":")
    if not isinstance(value, str) or not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise OptionError(attribute.name, value, "must be 'host:port', e.g. '127.0.0.1:8000'")


def optional_host_port(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value != "":
        host_port(instance, attribute, value)


def int_le(maximum: int) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, int) and value > maximum:
            raise OptionError(attribute.name, value, f"must be <= {maximum}")

    return check


def boolean(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(attribute.name, value, "must be true or false")


def nonempty_str(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise OptionError(attribute.name, value, "must be a non-empty string")


class ImportPathCheck:
    """The validator of a setting that names an import path, ``"module:callable"``
    (``""``: none); with ``allow_callable``, code may give the callable itself;
    ``in_worker``: only the workers import it (the caller hands them the path).
    ``prefork.config._imports`` finds these settings by this class."""

    def __init__(self, allow_callable: bool, in_worker: bool = False) -> None:
        self.allow_callable = allow_callable
        self.in_worker = in_worker

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if self.allow_callable and callable(value):
            return
        if isinstance(value, str) and (value == "" or _CALLABLE_SPEC.match(value)):
            return
        wanted = "'module:callable', a callable or \"\"" if self.allow_callable else "'module:callable' or \"\""
        raise OptionError(attribute.name, value, f"must be {wanted}")

    def __repr__(self) -> str:
        return f"callable_spec(allow_callable={self.allow_callable}, in_worker={self.in_worker})"


def callable_spec(*, allow_callable: bool, in_worker: bool = False) -> ImportPathCheck:
    return ImportPathCheck(allow_callable, in_worker)


def as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def is_list(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple):
        raise OptionError(attribute.name, value, "must be a list")


_NOT_PLUGINS = (bool, int, float, list, tuple, dict, type(None))


def plugin_list(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or any(
        (isinstance(item, str) and not item) or (not isinstance(item, str) and isinstance(item, _NOT_PLUGINS))
        for item in value
    ):
        raise OptionError(attribute.name, value, "must be a list of plugin module names")


def check_field(cls: type, name: str, value: Any) -> Any:
    """Run the converter and validator of ``cls.name`` on ``value``; the converted value.

    Lets the loader judge one value before the whole object can be built.
    """
    field = getattr(attrs.fields(cls), name)
    if field.converter is not None:
        value = field.converter(value)
    if field.validator is not None:
        field.validator(None, field, value)
    return value


def freeze(value: Any) -> Any:
    """Plain dicts and lists (deeply) as read-only mappings and tuples; other objects as they are."""
    if type(value) is dict or type(value) is types.MappingProxyType:
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if type(value) is list or type(value) is tuple:
        return tuple(freeze(v) for v in value)
    return value


def frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType({k: freeze(v) for k, v in value.items()})


def read_only(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


def doc(text: str, type_name: str = "", *, serve_only: bool = False) -> dict[str, Any]:
    """Field metadata: ``doc`` for the reference, ``type`` where the annotation is not what a
    file holds, and ``serve_only`` for an ``[mpm]`` setting only ``prefork serve`` honours
    (``prefork.MPM`` refuses it)."""
    meta: dict[str, Any] = {"doc": text}
    if type_name:
        meta["type"] = type_name
    if serve_only:
        meta["serve_only"] = True
    return meta


def signal_map(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise OptionError(attribute.name, value, "must be a table of signal names to handlers")
    for key, handler in value.items():
        for name in str(key).split():
            full = name if name.startswith("SIG") else f"SIG{name}"
            if not hasattr(signal, full) or full in ("SIGKILL", "SIGSTOP"):
                raise OptionError(f"{attribute.name}.{key}", handler, f"{name!r} is not a signal a handler can be set for")
        if not (callable(handler) or isinstance(handler, str)):
            raise OptionError(f"{attribute.name}.{key}", handler, "must be a callable, 'DEFAULT', 'IGNORE' or 'module:callable'")


def strategy_kind(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in KINDS:
        raise OptionError(attribute.name, value, f"must be one of {', '.join(KINDS)}")
