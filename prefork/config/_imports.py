"""Import paths in a config: where they are found, and one clear line when one is wrong.

A config read from a file names modules beside that file (``app = "myapp:main"``,
``plugins = ["myplugin"]``, ``methods = { add = "myapp:add" }``).  So the file's
directory (symlinks resolved, as Python does for a script) is put at the front of
``sys.path`` when the file is read, unless it is on ``sys.path`` already, where it
stays: every import path of the config, in the caller and in the workers (which
inherit ``sys.path``), is found there first, then wherever Python finds it
otherwise.  First, because the config's author meant the module beside the file,
as ``python dir/script.py`` imports from ``dir`` first; the cost is that a module
there shadows a same-named one for the rest of the process, so the directory is
best kept for the config and its app.  The directory stays on ``sys.path``:
workers import handlers and task functions from it long after the config was read.

:func:`import_paths` lists every import path a config holds, :func:`import_setting`
imports one (a :class:`~prefork.errors.ConfigError` naming the source, key and
reason when it cannot), :func:`import_problems` tries them all (``prefork check``).
A strategy declares an option that holds import paths (a string, a list of them or
a table whose values are) with the field metadata ``"import": "callable"`` (each
must name a callable) or ``"import": "object"`` (a module, or anything a
``"module:attr"`` names), as the ``methods`` and ``classes`` resolvers do.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import attrs

from prefork.config._checks import ImportPathCheck
from prefork.config.model import TABLES, Config
from prefork.errors import ConfigError
from prefork.strategies.registry import KINDS
from prefork.strategies.resolver import import_object

__all__ = ["ImportPath", "add_config_directory", "import_paths", "import_problems", "import_setting", "pool_callable",
           "setting_source"]

#: child_sigh values that are actions, not import paths
_SIGNAL_ACTIONS = ("DEFAULT", "IGNORE")


def add_config_directory(path: str | os.PathLike[str]) -> str:
    """Put the directory of the config file ``path`` at the front of ``sys.path``,
    unless it is on it already; the directory."""
    directory = os.path.dirname(os.path.realpath(path))
    on_path = {os.path.realpath(entry or os.curdir) for entry in sys.path if isinstance(entry, str)}
    if directory not in on_path:
        sys.path.insert(0, directory)
    return directory


def setting_source(config: Config, key: str) -> str:
    """The layer that set the dotted ``key`` (or the nearest table around it); a list's
    item, ``resolver.classes[0]``, was set with its list."""
    parts = re.sub(r"\[\d+\]$", "", key).split(".")
    for end in range(len(parts), 0, -1):
        found = config.sources.get(".".join(parts[:end]))
        if found:
            return found
    return "the configuration"


class ImportPath(NamedTuple):
    """One import path of a config: its dotted key, the ``"module:attr"`` it holds,
    whether it must name a callable (else a bare ``"module"`` is a module to import),
    and whether only the workers import it (``boss_worker.work_handler``, the
    resolvers' options), which ``prefork run`` and ``serve`` leave to them."""

    key: str
    spec: str
    callable: bool = True
    in_worker: bool = False


def import_paths(config: Config) -> list[ImportPath]:
    """Every import path of ``config``: ``app``, the settings whose validator is
    :class:`ImportPathCheck` (``pool.initializer``, ``mpm.wsgi`` ...), the handlers of
    ``mpm.child_sigh``, and the strategy options declared as import paths (the
    resolvers' ``methods`` and ``classes``).  Plugins and strategy names are imported by
    :func:`prefork.config.load_config` already."""
    found: list[ImportPath] = []
    for prefix, cls, obj in [("", Config, config), *((f"{t}.", c, getattr(config, t)) for t, c in TABLES.items())]:
        for field in attrs.fields(cls):
            value = getattr(obj, field.name)
            if isinstance(field.validator, ImportPathCheck) and isinstance(value, str) and value:
                found.append(ImportPath(f"{prefix}{field.name}", value, in_worker=field.validator.in_worker))
    for names, handler in config.mpm.child_sigh.items():
        if isinstance(handler, str) and handler not in _SIGNAL_ACTIONS:
            found.append(ImportPath(f"mpm.child_sigh.{names}", handler))
    for kind in KINDS:
        found += _strategy_paths(config, kind)
    return found


def _strategy_paths(config: Config, kind: str) -> list[ImportPath]:
    spec = config.spec(kind)
    cls = config.registry.get(kind, spec.name) if spec.instance is None else None
    if cls is None or not attrs.has(cls):
        return []
    found: list[ImportPath] = []
    for field in attrs.fields(cls):
        want = field.metadata.get("import")
        value = spec.options.get(field.alias or field.name)
        if want not in ("callable", "object") or value is None:
            continue
        key = f"{kind}.{field.alias or field.name}"
        items: list[tuple[str, Any]] = [(key, value)]
        if isinstance(value, Mapping):
            items = [(f"{key}.{name}", item) for name, item in value.items()]
        elif isinstance(value, list | tuple):
            items = [(f"{key}[{n}]", item) for n, item in enumerate(value)]
        found += [ImportPath(k, item, want == "callable", in_worker=True) for k, item in items
                  if isinstance(item, str) and item]
    return found


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _missing_module(exc: ModuleNotFoundError, module: str) -> bool:
    """``module`` (or a package above it) is not there, as opposed to a module it imports itself."""
    parts = module.split(".")
    return exc.name in {".".join(parts[:n]) for n in range(1, len(parts) + 1)}


def import_setting(config: Config, key: str, spec: str, calls: str = "", want_callable: bool = True) -> Any:
    """The callable the setting ``key`` (``spec``, ``"module:attr"``) names; a
    :class:`ConfigError` naming the source, key and value when it cannot be imported
    (or its module raises on import) or is not callable.  ``calls`` says how it is
    called, for the message.  Without ``want_callable``, anything will do, and a
    bare ``"module"`` is that module."""
    where = f"{setting_source(config, key)}: {key} = {spec!r}"
    bare = not want_callable and ":" not in spec
    module = spec if bare else spec.partition(":")[0] if ":" in spec else spec.rpartition(".")[0]
    try:
        target: Any = importlib.import_module(spec) if bare else import_object(spec)
    except ModuleNotFoundError as exc:
        if _missing_module(exc, module):
            raise ConfigError(f"{where}: cannot import it: {_one_line(exc)}") from exc
        raise ConfigError(f"{where}: importing it raised ModuleNotFoundError: {_one_line(exc)}") from exc
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import it: {_one_line(exc)}") from exc
    except SyntaxError as exc:
        raise ConfigError(f"{where}: cannot import it: SyntaxError: {_one_line(exc)}") from exc
    except Exception as exc:
        raise ConfigError(f"{where}: importing it raised {type(exc).__name__}: {_one_line(exc)}") from exc
    if want_callable and not callable(target):
        raise ConfigError(f"{where}: {type(target).__name__} is not callable" + (f"; {calls}" if calls else ""))
    return target


def import_problems(config: Config, prefix: str = "", *, in_worker: bool = True) -> list[ConfigError]:
    """Import every import path of ``config`` whose key starts with ``prefix`` (without
    ``in_worker``, only those the caller's process imports itself); the problems, one
    :class:`ConfigError` each, in the order the keys are listed."""
    problems: list[ConfigError] = []
    for path in import_paths(config):
        if path.key.startswith(prefix) and (in_worker or not path.in_worker):
            try:
                import_setting(config, path.key, path.spec, want_callable=path.callable)
            except ConfigError as exc:
                problems.append(exc)
    return problems


def pool_callable(config: Config, name: str) -> Any:
    """``pool.<name>`` (``initializer``, ``finalizer``): itself, its ``"module:name"`` imported
    (a :class:`ConfigError` naming the setting when it cannot be), or ``None``."""
    spec = getattr(config.pool, name)
    return import_setting(config, f"pool.{name}", spec) if isinstance(spec, str) and spec else (spec or None)
