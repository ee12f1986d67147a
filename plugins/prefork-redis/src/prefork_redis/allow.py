"""What a remote task may call: an allow-list, never "any importable function".

A task that comes over the network names its method; the host must decide
whether to call it.  prefork's default resolver (``chain``) imports any
``module:function`` a task names, which over a network is code execution for
whoever can submit (``os:system``).  So a host serving a Redis stream runs a
method only when the host registered it:

* ``[resolver] name = "allow"``, this module's :class:`AllowResolver`: a
  ``methods`` map (name -> function or ``"module:function"``), ``allow``
  patterns (``"module:function"``, or ``"package.module:*"`` for every public
  top-level name of that one module) and, in code, ``functions`` (each called
  by its ``module:qualname``, the name :class:`prefork_redis.Client` sends for
  a function);
* or the names other resolvers register: the ``methods`` map of the
  ``methods`` and ``chain`` resolvers, the public attributes of the
  ``classes`` they list; never the ``chain`` resolver's imports, unless the
  transport says ``allow_any_import = true``.

:func:`remote_gate` turns the pool's resolver into that decision, made in the
supervisor before a task reaches a worker.  Names with a part starting with
``_`` are never allowed (prefork never dispatches them either).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

import attrs

from prefork.errors import OptionError
from prefork.strategies.resolver import (
    ChainResolver,
    ClassesResolver,
    MethodsResolver,
    import_object,
    is_private,
)

__all__ = ["AllowResolver", "Gate", "check_pattern", "remote_gate"]

_DOTTED: Final = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
#: ``module:attr.path``: what a remote task may name as its method.
_NAME: Final = re.compile(rf"{_DOTTED}:{_DOTTED}")
#: ``module:attr.path`` or ``module:*``: an ``allow`` pattern.
_PATTERN: Final = re.compile(rf"(?P<module>{_DOTTED}):(?P<attr>{_DOTTED}|\*)")


def check_pattern(pattern: object) -> str:
    """Why ``pattern`` is not a valid ``allow`` pattern ('' when it is)."""
    if not isinstance(pattern, str):
        return "must be a string 'module:function' or 'package.module:*'"
    if not _PATTERN.fullmatch(pattern):
        return "must be 'module:function' or 'package.module:*' (one module; no other wildcards)"
    if is_private(pattern.replace(":*", "")):
        return "names a part that starts with '_': such names are never dispatched"
    return ""


def _check_allow(instance: Any, attribute: Any, value: Sequence[Any]) -> None:
    for pattern in value:
        problem = check_pattern(pattern)
        if problem:
            raise OptionError(f"{attribute.name}", pattern, problem)


def _as_patterns(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        raise OptionError("allow", value, 'must be a list of patterns, such as ["thumbnails.tasks:*"]')
    return tuple(value)


def _check_methods(instance: Any, attribute: Any, value: Mapping[Any, Any]) -> None:
    if not isinstance(value, Mapping):
        raise OptionError("methods", value, "must be a table of name = 'module:function'")
    for key, target in value.items():
        if not isinstance(key, str) or not key or is_private(key):
            raise OptionError(
                "methods", key, "a method name must be a non-empty string without a part starting with '_'"
            )
        if isinstance(target, str):
            if not _NAME.fullmatch(target) or is_private(target):
                raise OptionError(f"methods.{key}", target, "must be a 'module:function' path without private parts")
        elif not callable(target):
            raise OptionError(f"methods.{key}", target, "must be a function or a 'module:function' string")


def function_name(fn: Any) -> str:
    """``module:qualname``, the name a client sends for ``fn`` (see ``prefork_redis.client``)."""
    return f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"


def _as_functions(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise OptionError(
            "functions", value, "must be a list of functions (in code: overrides={'resolver.functions': [...]})"
        )
    return tuple(value)


def _check_functions(instance: Any, attribute: Any, value: Sequence[Any]) -> None:
    for fn in value:
        if not callable(fn):
            raise OptionError("functions", fn, "must be functions (in a file, use methods or allow)")
        name = function_name(fn)
        if not _NAME.fullmatch(name) or name.startswith("__main__:") or is_private(name):
            raise OptionError(
                "functions", fn, f"its name {name!r} cannot be sent by a client: register it in methods under a name"
            )


@attrs.frozen
class AllowResolver:
    """Only what is registered: a methods map, named functions, and ``module:function``
    patterns; ``None`` for every other name (nothing is imported for it)."""

    name: ClassVar[str] = "allow"
    methods: Mapping[str, Any] = attrs.field(
        factory=dict, validator=_check_methods,
        metadata={"doc": "map of a method name to a function or a 'module:function' path"},
    )  # fmt: skip
    allow: tuple[str, ...] = attrs.field(
        factory=tuple, converter=_as_patterns, validator=_check_allow,
        metadata={"doc": "import paths a task may name: 'module:function', or 'package.module:*' (its public names)"},
    )  # fmt: skip
    functions: tuple[Callable[..., Any], ...] = attrs.field(
        factory=tuple, converter=_as_functions, validator=_check_functions,
        metadata={"doc": "functions a task may name by 'module:qualname' (code only)"},
    )  # fmt: skip

    def _named(self) -> dict[str, Callable[..., Any]]:
        return {function_name(fn): fn for fn in self.functions}

    def _matches(self, name: str) -> bool:
        module, _, attr = name.partition(":")
        for pattern in self.allow:
            p_module, _, p_attr = pattern.partition(":")
            if p_module == module and (p_attr == attr or (p_attr == "*" and "." not in attr)):
                return True
        return False

    def permits(self, name: object) -> bool:
        """Whether a task may call ``name``; decided without importing anything."""
        if not isinstance(name, str) or not name or is_private(name):
            return False
        if name in self.methods or name in self._named():
            return True
        return bool(_NAME.fullmatch(name)) and self._matches(name)

    def resolve(self, method: str) -> Callable[..., Any] | None:
        if not self.permits(method):
            return None
        target: Any = self.methods.get(method) or self._named().get(method)
        if target is None:
            try:
                target = import_object(method)  # a pattern matched: the module is one the host named
            except AttributeError:
                return None  # 'module:*' and no such name in it
        elif isinstance(target, str):
            target = import_object(target)
        return target if callable(target) else None

    def size(self) -> int:
        """How many names and patterns are registered (0: nothing may be called)."""
        return len(self.methods) + len(self.allow) + len(self.functions)


@attrs.frozen
class Gate:
    """The decision made in the supervisor for each remote task's method name."""

    permits: Callable[[object], bool]
    #: 0 when nothing at all may be called (the host would refuse every task)
    size: int
    #: what the host registered, for its start-up log
    what: str


def _registered(resolver: Any) -> tuple[Callable[[object], bool], int, str] | None:
    """The names ``resolver`` registers (never those it would only import), or None
    when it has no registered set (``import``, ``xmlrpc``, a third party's)."""
    if isinstance(resolver, AllowResolver):
        return resolver.permits, resolver.size(), f"the {resolver.name!r} resolver"
    if isinstance(resolver, MethodsResolver):
        names = dict(resolver.methods)
        return (lambda n: isinstance(n, str) and n in names), len(names), "the methods map"
    if isinstance(resolver, ClassesResolver):
        return _classes(resolver), len(resolver.classes), "the classes"
    if isinstance(resolver, ChainResolver):
        parts: list[Callable[[object], bool]] = []
        size = len(resolver.methods) + len(resolver.classes)
        names = dict(resolver.methods)
        parts.append(lambda n: isinstance(n, str) and n in names)
        if resolver.classes:
            parts.append(_classes(ClassesResolver(resolver.classes)))
        for extra in resolver.extra:
            known = _registered(extra)
            if known is not None:
                parts.append(known[0])
                size += known[1]
        return (lambda n: any(p(n) for p in parts)), size, "the chain resolver's methods and classes (not its imports)"
    return None


def _classes(resolver: ClassesResolver) -> Callable[[object], bool]:
    def permits(name: object) -> bool:
        if not isinstance(name, str) or ":" in name or is_private(name):
            return False
        return resolver.resolve(name) is not None

    return permits


def remote_gate(resolver: Any, allow_any_import: bool = False) -> Gate:
    """What remote tasks may call on a pool whose resolver is ``resolver``.

    ``allow_any_import`` opens it to every name the resolver finds, imports
    included: the behaviour before allow-lists, for networks where whoever
    can submit may run any code on the hosts.
    """
    if allow_any_import:
        return Gate(
            lambda n: isinstance(n, str) and not is_private(n), -1, f"anything the {resolver.name!r} resolver finds"
        )
    known = _registered(resolver)
    if known is None:
        return Gate(lambda n: False, 0, f"nothing: the {resolver.name!r} resolver registers no names")
    permits, size, what = known
    return Gate(lambda n: not (isinstance(n, str) and is_private(n)) and permits(n), size, what)
