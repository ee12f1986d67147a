"""The registry through which every strategy, built-in or third party, is found.

Plugins receive a :class:`StrategyRegistry` in the ``prefork_register_strategies``
hook and call :meth:`StrategyRegistry.register`.  A config value such as
``transport = "pipe"`` is looked up here; a miss lists the known names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Any, Final

import attrs

from prefork.errors import ConfigError, OptionError, PluginError
from prefork.strategies import optional

#: The five kinds of strategy, in the order the docs list them.
KINDS: Final = ("scaling", "transport", "serializer", "resolver", "sink")


def did_you_mean(word: str, choices: list[str]) -> str:
    """A ``did you mean 'x'?`` tail for an error message, or ``""``."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


#: what the core uses of each kind of strategy: a class lacking one cannot be registered
REQUIRED: dict[str, tuple[str, ...]] = {
    "scaling": ("max_workers", "decide"),
    "transport": ("socketpair", "parent_channel", "child_channel"),
    "serializer": ("objects", "dumps", "loads"),
    "resolver": ("resolve",),
    "sink": ("attach", "claim", "deliver"),
}


@attrs.frozen
class Registration:
    kind: str
    name: str
    cls: type
    plugin: str


class StrategyRegistry:
    """Maps (kind, name) to a strategy class, remembering which plugin registered it."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Registration] = {}
        self._current_plugin = "<unknown>"

    def _set_plugin(self, plugin: str) -> None:
        self._current_plugin = plugin

    def register(self, kind: str, cls: type, name: str | None = None) -> None:
        """Register ``cls`` as the ``kind`` strategy called ``name`` (default: ``cls.name``).

        A second registration of the same name is an error, never a silent override.
        """
        if kind not in KINDS:
            raise PluginError(
                f"plugin {self._current_plugin!r} registered {cls!r} under unknown kind "
                f"{kind!r}; kinds are {', '.join(KINDS)}"
            )
        key_name = name if name is not None else getattr(cls, "name", None)
        if not isinstance(key_name, str) or not key_name:
            raise PluginError(
                f"plugin {self._current_plugin!r} registered {cls!r} as a {kind} strategy "
                "without a name (give name= or a class attribute `name`)"
            )
        missing = [member for member in REQUIRED.get(kind, ()) if not hasattr(cls, member)]
        if missing:
            raise PluginError(
                f"{kind} {key_name!r} (plugin {self._current_plugin!r}, {getattr(cls, '__qualname__', cls)!r}) lacks "
                + ", ".join(f"`{m}`" for m in missing)
                + f": a {kind} strategy needs {', '.join(f'`{m}`' for m in REQUIRED[kind])} (see docs/plugins.md)"
            )
        optional.check(kind, cls, f"{key_name!r} (plugin {self._current_plugin!r})")
        old = self._entries.get((kind, key_name))
        if old is not None:
            raise PluginError(
                f"{kind} strategy {key_name!r} is registered twice: by {old.plugin!r} "
                f"({old.cls.__qualname__}) and by {self._current_plugin!r} ({cls.__qualname__})"
            )
        self._entries[(kind, key_name)] = Registration(kind, key_name, cls, self._current_plugin)

    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self._entries if k == kind)

    def get(self, kind: str, name: str, where: str = "") -> type:
        """The class registered as ``name``; a :class:`ConfigError` naming the choices if none."""
        try:
            return self._entries[(kind, name)].cls
        except KeyError:
            known = self.names(kind)
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}unknown {kind} strategy {name!r}{did_you_mean(name, known)} "
                f"(known: {', '.join(known) or 'none'})"
            ) from None

    def __iter__(self) -> Iterator[Registration]:
        return iter(sorted(self._entries.values(), key=lambda r: (KINDS.index(r.kind), r.name)))

    def create(self, kind: str, name: str, options: Mapping[str, Any], where: str = "") -> Any:
        """Instantiate a strategy from its config options, with errors naming ``where``.

        ``where`` is the location prefix, such as ``prefork.toml: scaling``; an
        error reads ``prefork.toml: scaling.workers = -1: must be >= 0``.
        """
        cls = self.get(kind, name, where)
        return build_options(cls, options, where)


def option_names(cls: type) -> list[str]:
    """The option names a strategy class accepts (its attrs init fields)."""
    if attrs.has(cls):
        return [f.alias or f.name for f in attrs.fields(cls) if f.init]
    return []


def build_options(cls: type, options: Mapping[str, Any], where: str) -> Any:
    """``cls(**options)`` with unknown keys and validator failures worded for a user."""
    known = option_names(cls)
    for key in options:
        if key not in known:
            raise ConfigError(
                f"{where}.{key}: unknown option{did_you_mean(key, known)} "
                f"(options of {getattr(cls, 'name', cls.__name__)!r}: {', '.join(known) or 'none'})"
            )
    try:
        return cls(**options)
    except OptionError as exc:
        err = ConfigError(f"{where}.{exc}")
        err.option = exc
        raise err from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
