"""Reading the configuration: packaged profile < the user's file < keyword arguments.

Layers merge per key (tables recursively, other values replace) and every key
remembers the layer that last set it, so an error names the file, the profile
or ``keyword arguments`` the bad value came from.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import pkgutil
import tomllib
from collections.abc import Mapping
from typing import Any, Final

import attrs

from prefork.config._imports import add_config_directory
from prefork.config.model import (
    ALL_KEYS,
    TABLES,
    TOP_LEVEL_KEYS,
    Config,
    StrategySpec,
    check_field,
    freeze,
    is_int,
    is_number,
)
from prefork.errors import ConfigError, OptionError, PluginError
from prefork.plugins import build_plugin_manager, build_registry
from prefork.strategies.registry import KINDS, StrategyRegistry, did_you_mean

__all__ = ["DEFAULT_PROFILE", "KEYWORDS", "load_config", "profile_names", "profile_text"]

DEFAULT_PROFILE: Final = "executor"
#: The source named for values given to :func:`load_config` as ``overrides``.
KEYWORDS: Final = "keyword arguments"

KeyPath = tuple[str, ...]


# -- profiles -----------------------------------------------------------------------------


def _profiles_dir() -> Any:
    return importlib.resources.files("prefork.config").joinpath("profiles")


def profile_names() -> list[str]:
    """The packaged profiles, sorted."""
    return sorted(p.name.removesuffix(".toml") for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


@functools.cache
def profile_text(name: str) -> str:
    """The TOML text of a packaged profile."""
    text: str = _profiles_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return text


# -- reading and layering -----------------------------------------------------------------


#: a config file larger than this is refused before it is parsed
MAX_CONFIG_BYTES: Final = 1 << 20
#: tables and arrays nested deeper than this are refused (a config needs a few levels)
MAX_CONFIG_DEPTH: Final = 32


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{source}: invalid TOML: nested too deep (a config has at most {MAX_CONFIG_DEPTH} levels)") from None
    _check_depth(data, source)
    return data


def _check_depth(data: Any, source: str) -> None:
    """Refuse nesting past ``MAX_CONFIG_DEPTH`` (iteratively: deep data must not overflow the stack)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: tables or arrays nested more than {MAX_CONFIG_DEPTH} levels deep")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


@functools.lru_cache(maxsize=16)
def _profile_layer(profile: str, source: str) -> dict[str, Any]:
    """A packaged profile, parsed once per process (callers take a ``_plain`` copy)."""
    data = _normalize(_parse(profile_text(profile), source), source)
    data.pop("profile", None)
    return data


def _read_file(path: str | os.PathLike[str], source: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: the config file is larger than {MAX_CONFIG_BYTES // 1024} KiB; a config is a few settings")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: the config file is not UTF-8 text: {exc}") from None
    return _parse(text, source)


def _plain(value: Any) -> Any:
    """Mappings (deeply) as fresh dicts and lists as fresh lists, so merging never touches the caller's objects."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) is list:
        return [_plain(v) for v in value]
    return value


def _expand(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments as a nested dict: ``{"scaling.workers": 4}`` is ``{"scaling": {"workers": 4}}``."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or "" in key.split("."):
            raise ConfigError(f"{KEYWORDS}: {key!r}: a key must be a name or a dotted path such as 'pool.prefetch'")
        *parents, last = key.split(".")
        target = out
        for depth, part in enumerate(parents):
            current = target.get(part)
            if current is None:
                current = target[part] = {}
            elif depth == 0 and part in KINDS and isinstance(current, str):
                current = target[part] = {"name": current}
            elif not isinstance(current, dict):
                if depth == 0 and part in KINDS:
                    raise ConfigError(f"{KEYWORDS}: {key}: a {part} given as an object takes no options "
                                      "from the config: give them to the object")
                raise ConfigError(f"{KEYWORDS}: {'.'.join(parents[: depth + 1])} = {current!r}: "
                                  f"must be a table to set {key}")
            target = current
        if not parents and last in KINDS and isinstance(value, str):
            value = {"name": value}
        elif not parents and last in KINDS and not isinstance(value, Mapping):
            out[last] = value  # a class or an instance: _normalize names it
            continue
        value = _plain(value)
        if isinstance(target.get(last), dict) and isinstance(value, dict):
            _merge_plain(target[last], value)
        else:
            target[last] = value
    return out


def _merge_plain(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge_plain(base[key], value)
        else:
            base[key] = value


def _normalize(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """One layer with the strategy shorthand expanded and the table shapes checked."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in KINDS:
            if isinstance(value, str):
                value = {"name": value}
            elif isinstance(value, type):  # a strategy class given in code: its import path names it
                value = {"name": _import_path(value), _CLASS: value}
            elif not isinstance(value, Mapping):
                if source != KEYWORDS:
                    raise ConfigError(f"{source}: {key} = {value!r}: must be a table or a strategy name")
                value = {"name": _import_path(type(value)), _OBJECT: value}  # an instance, used as it is
        elif key in TABLES and not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} = {value!r}: must be a table")
        out[key] = _plain(value)
    return out


@attrs.define
class _Layers:
    """The merged data and, for every key path, the layer that last set it."""

    data: dict[str, Any] = attrs.field(factory=dict)
    sources: dict[KeyPath, str] = attrs.field(factory=dict)
    fallback: str = "defaults"

    def add(self, layer: Mapping[str, Any], source: str) -> None:
        self._merge(self.data, layer, (), source)

    def _forget(self, path: KeyPath) -> None:
        for key in [k for k in self.sources if k[: len(path)] == path]:
            del self.sources[key]

    def _merge(self, base: dict[str, Any], new: Mapping[str, Any], path: KeyPath, source: str) -> None:
        for key, value in new.items():
            here = (*path, key)
            if isinstance(value, dict):
                current = base.get(key)
                renamed = not path and key in KINDS and "name" in value and value["name"] != (current or {}).get("name")
                if not isinstance(current, dict) or renamed:
                    # A different strategy: the earlier layers' options were meant for another class.
                    current = base[key] = {}
                    self._forget(here)
                self.sources[here] = source
                self._merge(current, value, here, source)
            else:
                base[key] = value
                self._forget(here)
                self.sources[here] = source

    def source(self, *path: str) -> str:
        """The layer that set ``path``, or the nearest enclosing table."""
        for end in range(len(path), 0, -1):
            found = self.sources.get(path[:end])
            if found is not None:
                return found
        return self.fallback

    def dotted_sources(self) -> dict[str, str]:
        return {".".join(path): source for path, source in self.sources.items()}


# -- validation ---------------------------------------------------------------------------


def _check_keys(keys: Any, known: list[str], layers: _Layers, table: str = "") -> None:
    for key in keys:
        if key not in known:
            path = (table, key) if table else (key,)
            raise ConfigError(f"{layers.source(*path)}: {'.'.join(path)}: unknown key{did_you_mean(key, known)}")


def _option_error(layers: _Layers, table: str, exc: OptionError) -> ConfigError:
    source = layers.source(*(table.split(".") if table else ()), *exc.key.split("."))
    prefix = f"{table}." if table else ""
    return ConfigError(f"{source}: {prefix}{exc}")


_SIMPLE_TYPES: Final = {"int": int, "float": float, "bool": bool, "str": str, int: int, float: float, bool: bool, str: str}


def _simple_type(field: attrs.Attribute[Any]) -> type | None:
    """The plain type an option wants, when its class declares one (a converter may widen it)."""
    converter: Any = field.converter
    if converter is float or converter is int:
        return float if converter is float else int
    if converter is not None:
        return None
    declared: Any = field.type
    return _SIMPLE_TYPES.get(declared)


def _type_problem(wanted: type, value: Any) -> str | None:
    if wanted is int and not is_int(value):
        return "must be an integer"
    if wanted is float and not is_number(value):
        return "must be a number"
    if wanted is bool and not isinstance(value, bool):
        return "must be true or false"
    if wanted is str and not isinstance(value, str):
        return "must be a string"
    return None


_CLASS: Final = "\x00class"  #: a strategy class given in code (not a key a file can hold)
_OBJECT: Final = "\x00object"  #: a strategy instance given in code


def _import_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _register_path(registry: StrategyRegistry, layers: _Layers, kind: str, name: str, cls: Any) -> None:
    """A strategy named by its import path (``myapp.policies:MyPolicy``) or given as a class:
    registered under that path, with the checks every registration gets."""
    source = layers.source(kind, "name")
    if cls is None:
        try:
            cls = pkgutil.resolve_name(name)
        except Exception as exc:
            raise ConfigError(f"{source}: {kind}.name = {name!r}: cannot import it: {exc}") from None
    if not isinstance(cls, type):
        raise ConfigError(f"{source}: {kind}.name = {name!r}: is a {type(cls).__name__}, not a class")
    try:
        if name not in registry.names(kind) or registry.get(kind, name) is not cls:
            registry.register(kind, cls, name=name)
    except PluginError as exc:
        raise ConfigError(f"{source}: {kind}.name = {name!r}: {exc}") from None


def _strategy(registry: StrategyRegistry, layers: _Layers, kind: str) -> StrategySpec:
    section = layers.data.get(kind)
    if section is None:
        raise ConfigError(f"{layers.fallback}: {kind}: no strategy chosen; set {kind}.name "
                          f"(known: {', '.join(registry.names(kind))})")
    section = dict(section)
    name = section.get("name")
    given_cls = section.pop(_CLASS, None)
    instance = section.pop(_OBJECT, None)
    if isinstance(name, str) and ":" in name and (given_cls is not None or instance is not None or name not in registry.names(kind)):
        _register_path(registry, layers, kind, name, given_cls or (type(instance) if instance is not None else None))
    if instance is not None:
        extra = sorted(key for key in section if key != "name")
        if extra:
            raise ConfigError(f"{layers.source(kind, extra[0])}: {kind}.{extra[0]}: a {kind} given as an object "
                              "takes no options from the config: give them to the object")
        return StrategySpec(kind=kind, name=str(name), instance=instance)
    known = registry.names(kind)
    if not isinstance(name, str) or name not in known:
        source = layers.source(kind, "name") if "name" in section else layers.source(kind)
        if not isinstance(name, str):
            raise ConfigError(f"{source}: {kind}.name = {name!r}: must be a strategy name (known: {', '.join(known)})")
        hint = did_you_mean(name, known)
        raise ConfigError(f"{source}: {kind}.name = {name!r}: unknown {kind} strategy{hint} (known: {', '.join(known)})")
    options = freeze({key: value for key, value in section.items() if key != "name"})
    cls = registry.get(kind, name)
    fields = {f.alias or f.name: f for f in attrs.fields(cls) if f.init} if attrs.has(cls) else {}
    unknown = [key for key in options if key not in fields]
    for key, value in options.items():
        wanted = None if key in unknown else _simple_type(fields[key])
        problem = _type_problem(wanted, value) if wanted is not None else None
        if problem:
            raise ConfigError(f"{layers.source(kind, key)}: {kind}.{key} = {value!r}: {problem}")
    source = layers.source(kind, unknown[0]) if unknown else layers.source(kind, "name")
    try:
        registry.create(kind, name, options, f"{source}: {kind}")
    except ConfigError as exc:
        if exc.option is not None:
            raise _option_error(layers, kind, exc.option) from None
        raise
    except Exception as exc:
        raise ConfigError(f"{source}: {kind}: cannot create the {kind} strategy {name!r}: {exc}") from exc
    return StrategySpec(kind=kind, name=name, options=options)


def _choose_profile(
    file_data: Mapping[str, Any], overrides: Mapping[str, Any], path_source: str, default: str = DEFAULT_PROFILE
) -> tuple[str, str]:
    if "profile" in overrides:
        chosen, source = overrides["profile"], KEYWORDS
    elif "profile" in file_data:
        chosen, source = file_data["profile"], path_source
    else:
        return default, "defaults"
    names = profile_names()
    if not isinstance(chosen, str) or chosen not in names:
        hint = did_you_mean(chosen, names) if isinstance(chosen, str) else ""
        raise ConfigError(f"{source}: profile = {chosen!r}: unknown profile{hint} (available: {', '.join(names)})")
    return chosen, source


def load_facade_config(
    profile: str,
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
) -> Config:
    """A facade's config: its ``profile`` (unless the file or ``overrides`` name another),
    the file, then ``overrides``, then the facade's keyword ``settings`` (dotted keys;
    ``None`` values are left out, so only the arguments given override)."""
    kw: dict[str, Any] = dict(overrides or {})
    kw.update((key, value) for key, value in settings.items() if value is not None)
    return load_config(path, kw, default_profile=profile)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    default_profile: str = DEFAULT_PROFILE,
) -> Config:
    """The validated :class:`Config`: the profile, then the file at ``path``, then ``overrides``.

    ``overrides`` is a nested dict or has dotted keys (``{"scaling.workers": 4}``);
    its values may be Python objects, such as a callable for ``pool.initializer``.
    Every problem is a :class:`ConfigError` naming the source, key, value and reason.

    The directory of the file at ``path`` goes to the front of ``sys.path`` (unless it
    is on it already), so that the modules the file names beside itself are found
    there first (``prefork.config._imports`` says why).
    """
    file_source = os.fsdecode(path) if path is not None else ""
    file_data: dict[str, Any] = {}
    if path is not None:
        file_data = _normalize(_read_file(path, file_source), file_source)
        add_config_directory(path)
    keyword_data = _normalize(_expand(overrides or {}), KEYWORDS)
    profile, profile_source = _choose_profile(file_data, keyword_data, file_source, default_profile)

    layers = _Layers(fallback=f"profile {profile!r}")
    profile_data = _plain(_profile_layer(profile, layers.fallback))
    layers.add(profile_data, layers.fallback)
    layers.add(file_data, file_source)
    layers.add(keyword_data, KEYWORDS)
    layers.data["profile"] = profile
    layers.sources[("profile",)] = profile_source

    data = layers.data
    _check_keys(data, list(ALL_KEYS), layers)
    for table, cls in TABLES.items():
        _check_keys(data.get(table, {}), [f.name for f in attrs.fields(cls)], layers, table)
    top: dict[str, Any] = {}
    try:
        for key in TOP_LEVEL_KEYS:
            if key in data:
                top[key] = check_field(Config, key, data[key])
    except OptionError as exc:
        raise _option_error(layers, "", exc) from None
    tables: dict[str, Any] = {}
    for table, cls in TABLES.items():
        try:
            tables[table] = cls(**data.get(table, {}))
        except OptionError as exc:
            raise _option_error(layers, table, exc) from None

    try:
        pm = build_plugin_manager(top.get("plugins", ()))
        registry = build_registry(pm)
    except PluginError as exc:
        raise ConfigError(f"{layers.source('plugins')}: {exc}") from exc
    specs = {kind: _strategy(registry, layers, kind) for kind in KINDS}
    fields: dict[str, Any] = {**top, **tables, **specs}
    try:
        return Config(plugin_manager=pm, registry=registry, sources=layers.dotted_sources(), **fields)
    except OptionError as exc:
        raise _option_error(layers, "", exc) from None
