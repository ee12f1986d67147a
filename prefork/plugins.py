"""Assembling the plugin manager, always in the same order.

1. the hookspecs;
2. names blocked by ``PREFORK_DISABLE_PLUGINS`` (comma separated);
3. the built-in strategy modules (they use the same hook as anyone);
4. installed plugins from the ``prefork`` entry-point group, unless
   ``PREFORK_DISABLE_PLUGIN_AUTOLOAD`` is set;
5. the modules the config lists in ``plugins = [...]``;
6. ``check_pending()``: an implementation of an unknown hook is an error.

pluggy calls the last registered implementation first, so user plugins run
before built-ins.  A strategy name registered twice is an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from types import FunctionType, MethodType, ModuleType
from typing import Any, ClassVar, Final

import pluggy

from prefork import hookspecs
from prefork._hooks import NAME
from prefork.errors import PluginError
from prefork.strategies.registry import StrategyRegistry

BUILTIN_PLUGINS: Final = (
    "prefork.strategies.scaling",
    "prefork.strategies.backlog",
    "prefork.strategies.transport",
    "prefork.strategies.serializer",
    "prefork.strategies.resolver",
    "prefork.strategies.sink",
)


_HOOKABLE: Final = (FunctionType, MethodType, classmethod, staticmethod)


class _Manager(pluggy.PluginManager):
    """pluggy looks at every name of a plugin through ``inspect.getattr_static``;
    for modules that was 70% of starting a pool.  A module's name can only be a
    hook when it holds a function, method, classmethod or staticmethod (pluggy's own
    rule), so every other name is passed over at once, and the verdict on a
    function is remembered for as long as the module holds that same function."""

    _verdicts: ClassVar[dict[tuple[int, str, str], tuple[object, Any]]] = {}

    def _cached(self, plugin: Any, name: str, kind: str, parse: Callable[[Any, str], Any]) -> Any:
        if type(plugin) is not ModuleType:
            return parse(plugin, name)
        value = plugin.__dict__.get(name)
        if not isinstance(value, _HOOKABLE):
            return None
        key = (id(plugin), name, kind)
        seen = self._verdicts.get(key)
        if seen is not None and seen[0] is value:
            return seen[1]
        verdict = parse(plugin, name)
        self._verdicts[key] = (value, verdict)
        return verdict

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        return self._cached(plugin, name, "impl", super().parse_hookimpl_opts)

    def parse_hookspec_opts(self, module_or_class: Any, name: str) -> Any:
        return self._cached(module_or_class, name, "spec", super().parse_hookspec_opts)


def build_plugin_manager(plugins: Sequence[str | object] = (), autoload: bool | None = None) -> pluggy.PluginManager:
    """A plugin manager with built-ins, entry points and ``plugins`` registered in order.

    ``plugins`` holds module names (imported here) or plugin objects.
    """
    pm = _Manager(NAME)
    pm.add_hookspecs(hookspecs)
    for blocked in filter(None, (n.strip() for n in os.environ.get("PREFORK_DISABLE_PLUGINS", "").split(","))):
        pm.set_blocked(blocked)
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    if autoload is None:
        autoload = _env_flag("PREFORK_DISABLE_PLUGIN_AUTOLOAD") is False
    if autoload:
        for ep in _installed_entry_points(tuple(sys.path)):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"installed plugin {ep.name!r} ({ep.value}, from {_dist_name(ep)}) cannot be loaded: {exc!r}; "
                    f"set PREFORK_DISABLE_PLUGINS={ep.name} to skip it"
                ) from exc
            _register(pm, plugin, ep.name)
    for plugin in plugins:
        if isinstance(plugin, str):
            if pm.get_plugin(plugin) is not None or pm.is_blocked(plugin):
                continue
            try:
                module = importlib.import_module(plugin)
            except ImportError as exc:
                raise PluginError(f"plugins = [...]: cannot import plugin module {plugin!r}: {exc}") from exc
            except Exception as exc:  # its code failed: which exception, on one line
                text = " ".join(str(exc).split())
                raise PluginError(f"plugins = [...]: cannot import plugin module {plugin!r}: "
                                  f"{type(exc).__name__}: {text}") from exc
            if pm.is_registered(module):
                continue  # already there, through its entry point
            _register(pm, module, plugin)
        elif not pm.is_registered(plugin):
            _register(pm, plugin, None)
    return _checked(pm)


def pool_plugin_manager(base: pluggy.PluginManager, plugins: Sequence[object]) -> pluggy.PluginManager:
    """A plugin manager for one pool: every plugin of ``base``, in the same order, then
    ``plugins`` (objects a facade registers for this pool alone, such as the
    dispatcher's special methods).  ``base`` (the config's, which other pools built
    from the same config share) is left as it was."""
    pm = _Manager(NAME)
    pm.add_hookspecs(hookspecs)
    for name, plugin in base.list_name_plugin():
        if plugin is not None:
            pm.register(plugin, name=name)
    for plugin in plugins:
        _register(pm, plugin, None)
    return _checked(pm)


def _checked(pm: pluggy.PluginManager) -> pluggy.PluginManager:
    """``pm`` once ``check_pending()`` passed: an implementation of an unknown hook is an error."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (hooks are listed in prefork.hookspecs)") from exc
    return pm


@lru_cache(maxsize=8)
def _installed_entry_points(path: tuple[str, ...]) -> tuple[importlib.metadata.EntryPoint, ...]:
    """The ``prefork`` entry points of the distributions on ``path`` (``sys.path``).

    Reading every distribution's metadata takes milliseconds; a process that
    starts many pools reads it once per ``sys.path``.
    """
    return tuple(importlib.metadata.entry_points(group=NAME))


def _env_flag(name: str) -> bool:
    """An environment switch: unset, empty, 0, false, no and off mean off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"distribution {dist.name!r}" if dist is not None else "an unknown distribution"


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin {name or plugin!r} cannot be registered: {exc}") from exc


def build_registry(pm: pluggy.PluginManager) -> StrategyRegistry:
    """Ask every plugin, in registration order, to register its strategies."""
    registry = StrategyRegistry()
    impls = pm.hook.prefork_register_strategies.get_hookimpls()  # first registered first
    for impl in impls:
        registry._set_plugin(impl.plugin_name)
        kwargs = {"registry": registry} if "registry" in impl.argnames else {}
        try:
            impl.function(**kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in prefork_register_strategies: {exc!r}") from exc
    return registry
