"""Method resolvers: how a request's method name becomes a callable, in the worker.

A resolver has ``resolve(name) -> callable | None``; ``None`` means "not mine",
so resolvers chain.  A request may also carry the callable itself, which skips
resolution.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs

from prefork._hooks import hookimpl
from prefork.errors import OptionError


@runtime_checkable
class MethodResolver(Protocol):
    """Turns a task's method name into the callable a worker runs: ``resolve``
    returns ``None`` for a name it does not know (docs/plugins.md, section 6)."""

    name: ClassVar[str]

    def resolve(self, method: str) -> Callable[..., Any] | None: ...


def is_private(method: str) -> bool:
    """Whether a method name is never dispatched: it, or any part of an import path
    (``module.sub:attr.attr``), starts with ``_`` (``_precall``, ``os:_exit``,
    ``builtins:__import__``).  Every resolver and every front keeps to it."""
    if method.startswith("_"):
        return True
    if ":" not in method and "." not in method:
        return False
    return any(part.startswith("_") for part in method.replace(":", ".").split("."))


def import_object(spec: str) -> Any:
    """The object ``"package.module:attr.sub"`` names, found by :func:`pkgutil.resolve_name`.

    The older ``"package.module.attr"`` is read as ``"package.module:attr"``: all but
    the last part is the module.  (``resolve_name`` would guess where the module ends
    by trying imports, and take an ``ImportError`` raised inside ``package.module``
    for "no such module", reporting a missing attribute instead.)

    Raises ``ImportError`` when the module cannot be imported or ``spec`` is not such
    a path (a bare module name included), ``AttributeError`` when an attribute is missing.
    """
    path = spec
    if ":" not in spec:
        module, _, attr = spec.rpartition(".")
        path = f"{module}:{attr}" if module and attr else ""
    # resolve_name's pattern ends in "$", which also matches before a final newline
    if path and not path.endswith("\n"):
        try:
            return pkgutil.resolve_name(path)
        except ValueError as exc:
            if str(exc) != f"invalid format: {path!r}":
                raise  # the module's own code raised it
    raise ImportError(f"{spec!r} is not of the form 'module:attribute' (dotted Python names)")


def _check_methods(instance: Any, attribute: Any, value: Mapping[str, Any]) -> None:
    for key, target in value.items():
        if not (callable(target) or isinstance(target, str)):
            raise OptionError(f"methods.{key}", target, "must be a callable or a 'module:callable' string")


@attrs.frozen
class MethodsResolver:
    """A name → callable map; values may also be ``"module:callable"`` strings."""

    name: ClassVar[str] = "methods"
    methods: Mapping[str, Any] = attrs.field(
        factory=dict, validator=_check_methods,
        metadata={"doc": "map of method name to callable or 'module:callable'", "import": "callable"},
    )

    def resolve(self, method: str) -> Callable[..., Any] | None:
        if method.startswith("_"):
            return None  # special and private names are never dispatched
        target = self.methods.get(method)
        if isinstance(target, str):
            target = import_object(target)
        return target


def _check_classes(instance: Any, attribute: Any, value: Sequence[Any]) -> None:
    if isinstance(value, str):
        raise OptionError("classes", value, "must be a list of classes, modules or 'module:Class' strings")


@attrs.frozen
class ClassesResolver:
    """Look the name up as an attribute of each class or module in turn."""

    name: ClassVar[str] = "classes"
    classes: Sequence[Any] = attrs.field(
        factory=tuple, converter=tuple, validator=_check_classes,
        metadata={"doc": "classes or modules (objects, or 'module' / 'module:Class' strings) searched in order",
                  "import": "object"},
    )

    def resolve(self, method: str) -> Callable[..., Any] | None:
        if method.startswith("_"):
            return None  # never expose private or special attributes by name
        for holder in self.classes:
            if isinstance(holder, str):
                holder = import_object(holder) if ":" in holder else importlib.import_module(holder)
            target = getattr(holder, method, None)
            if callable(target):
                return target  # type: ignore[no-any-return]
        return None


@attrs.frozen
class ImportResolver:
    """``"package.module:attr"`` imports and returns that attribute."""

    name: ClassVar[str] = "import"

    def resolve(self, method: str) -> Callable[..., Any] | None:
        if ":" not in method or is_private(method):
            return None
        target = import_object(method)
        return target if callable(target) else None


def _xmlrpc_transport(timeout: float) -> Any:
    """A client transport whose connections time out (xmlrpc.client, and the http and
    ssl modules under it, are imported here: they made ``import prefork`` 20 ms slower)."""
    import xmlrpc.client

    class _Transport(xmlrpc.client.Transport):
        def make_connection(self, host: Any) -> Any:
            conn = super().make_connection(host)
            conn.timeout = timeout
            return conn

    return _Transport()


class XmlRpcCall:
    """A remote method: calling it calls ``name`` on the XML-RPC server at ``url``."""

    __slots__ = ("name", "timeout", "url")

    def __init__(self, url: str, name: str, timeout: float) -> None:
        self.url = url
        self.name = name
        self.timeout = timeout

    def __call__(self, *args: Any) -> Any:
        import xmlrpc.client

        transport = _xmlrpc_transport(self.timeout) if self.url.startswith("http:") else None
        with xmlrpc.client.ServerProxy(self.url, transport=transport, allow_none=True) as proxy:
            return getattr(proxy, self.name)(*args)

    def __repr__(self) -> str:
        return f"<XmlRpcCall {self.name} at {self.url}>"


def _url(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise OptionError(attribute.name, value, "must be an http:// or https:// URL")


@attrs.frozen
class XmlRpcResolver:
    """Every public name is a method of an XML-RPC server (the dispatcher seed's
    server parent): the call is forwarded there, from the worker."""

    name: ClassVar[str] = "xmlrpc"
    #: every public name resolves (to a remote call): put it last in a chain
    catch_all: ClassVar[bool] = True
    url: str = attrs.field(validator=_url, metadata={"doc": "URL of the XML-RPC server, e.g. 'http://127.0.0.1:8000/RPC2'"})
    timeout: float = attrs.field(default=30.0, converter=float, metadata={"doc": "seconds to wait for the server's answer"})

    def resolve(self, method: str) -> Callable[..., Any] | None:
        if method.startswith("_"):
            return None
        return XmlRpcCall(self.url, method, self.timeout)


@attrs.frozen
class ChainResolver:
    """The methods map, then the classes in order, then ``module:attr`` imports,
    then any ``extra`` resolvers (objects given in code)."""

    name: ClassVar[str] = "chain"
    methods: Mapping[str, Any] = attrs.field(factory=dict, validator=_check_methods,
                                             metadata={"doc": "as for the 'methods' resolver", "import": "callable"})
    classes: Sequence[Any] = attrs.field(factory=tuple, converter=tuple, validator=_check_classes,
                                         metadata={"doc": "as for the 'classes' resolver", "import": "object"})
    imports: bool = attrs.field(default=True, metadata={"doc": "resolve 'module:attr' names by importing them"})
    extra: Sequence[MethodResolver] = attrs.field(factory=tuple, converter=tuple, metadata={"doc": "more resolver objects, tried last (code only)"})

    def resolve(self, method: str) -> Callable[..., Any] | None:
        links: list[MethodResolver] = [MethodsResolver(self.methods), ClassesResolver(self.classes)]
        if self.imports:
            links.append(ImportResolver())
        links.extend(self.extra)
        for link in links:
            target = link.resolve(method)
            if target is not None:
                return target
        return None


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    for cls in (MethodsResolver, ClassesResolver, ImportResolver, XmlRpcResolver, ChainResolver):
        registry.register("resolver", cls)
