"""A prefork plugin adding a method resolver for ``"math.<function>"`` names.

A resolver turns the method name a request carries into a callable, in the
worker.  ``resolve`` returns ``None`` for a name that is not its own, so
resolvers can be chained.  This one maps ``"math.sqrt"`` to :func:`math.sqrt`,
and so on for every public function of a module (``math`` unless the
``module`` option names another, such as ``cmath`` or ``statistics``).

Use it from ``prefork.toml``::

    plugins = ["examples.plugin_math_resolver"]

    [resolver]
    name = "math"
    prefix = "math."

then ``pool.submit("math.hypot", 3, 4)`` runs ``math.hypot(3, 4)`` in a worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar

import attrs

from prefork import hookimpl
from prefork.errors import OptionError


def _prefix(instance: Any, attribute: attrs.Attribute[str], value: Any) -> None:
    if not isinstance(value, str):
        raise OptionError(attribute.name, value, "must be a string such as 'math.'")


def _module(instance: Any, attribute: attrs.Attribute[str], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise OptionError(attribute.name, value, "must be a module name such as 'math'")
    try:
        importlib.import_module(value)
    except ImportError as exc:
        raise OptionError(attribute.name, value, f"cannot be imported: {exc}") from None


@attrs.frozen
class MathResolver:
    """``"<prefix><function>"`` names resolve to the functions of a module (``math``)."""

    name: ClassVar[str] = "math"
    prefix: str = attrs.field(
        default="math.",
        validator=_prefix,
        metadata={"doc": "the prefix a method name must carry; the rest names the function"},
    )
    module: str = attrs.field(
        default="math", validator=_module, metadata={"doc": "the module whose functions the names resolve to"}
    )

    def _target(self) -> ModuleType:
        return importlib.import_module(self.module)  # cached by the import system

    def resolve(self, method: str) -> Callable[..., Any] | None:
        if not method.startswith(self.prefix):
            return None  # not ours: the next resolver in a chain may know it
        attr = method[len(self.prefix) :]
        if not attr.isidentifier() or attr.startswith("_"):
            return None  # never hand out private or special attributes by name
        target = getattr(self._target(), attr, None)
        return target if callable(target) else None  # math.pi is not a method


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("resolver", MathResolver)
