"""prefork-msgpack: a msgpack serializer for prefork, and a plugin to copy.

This distribution is the worked example of a third-party prefork plugin.  A
plugin is three things, and this package has exactly those three:

1. **A strategy class.**  ``MsgpackSerializer`` below follows the
   :class:`prefork.Serializer` protocol: a class attribute ``name`` (the word a
   user writes in ``prefork.toml``), a class attribute ``objects`` (can it carry
   arbitrary Python objects? msgpack cannot), and ``dumps``/``loads``.  It is an
   ``attrs`` frozen class: every attrs field is an option a user may set in the
   config section, ``metadata={"doc": ...}`` documents it, and prefork rejects
   unknown option names with a did-you-mean before the class is ever called.
   A validator that raises :class:`prefork.errors.OptionError` gets its
   message prefixed with the file and section, as ``_boolean`` shows.

2. **A hook implementation.**  ``prefork_register_strategies(registry)``,
   decorated with ``prefork.hookimpl``, calls
   ``registry.register("serializer", MsgpackSerializer)``.  The kind is one of
   ``scaling``, ``transport``, ``serializer``, ``resolver``, ``sink``; the name
   comes from the class's ``name``.  A name that is already taken, built-in or
   not, is an error (:class:`prefork.PluginError`), never a silent override.

3. **An entry point.**  ``pyproject.toml`` declares::

       [project.entry-points.prefork]
       msgpack = "prefork_msgpack"

   Once the distribution is installed, prefork's plugin manager imports this
   module and registers it under the name ``msgpack`` in every process that
   builds a pool (unless ``PREFORK_DISABLE_PLUGIN_AUTOLOAD`` is set, or
   ``PREFORK_DISABLE_PLUGINS`` names ``msgpack``).

A user then selects the serializer in ``prefork.toml``::

    [serializer]
    name = "msgpack"
    use_bin_type = true

What msgpack carries: ``None``, ``bool``, ``int`` (from -2**63 to 2**64-1),
``float``, ``str``, ``bytes``, lists, tuples and dicts of those.  Tuples come
back as **lists**, as with the built-in ``json`` serializer.  Anything else
(an object, a set, an exception, a callable) raises :class:`TypeError` naming
its type, and an int outside that range raises :class:`OverflowError`; so with
``serializer = "msgpack"`` methods must be named, not passed.

See ``docs/plugins.md`` in the prefork repository for the full tutorial.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import msgpack

from prefork import hookimpl
from prefork.errors import OptionError

__all__ = ["MsgpackSerializer", "prefork_register_strategies"]


def _refuse(obj: Any) -> Any:
    # msgpack calls ``default`` for every value it has no encoding for,
    # including an int too large for 64 bits.
    if isinstance(obj, int):
        raise OverflowError(
            f"the msgpack serializer cannot encode the integer {obj}: msgpack integers range from -2**63 to 2**64-1"
        )
    cls = type(obj)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    raise TypeError(
        f"the msgpack serializer cannot encode an object of type {type_name!r} "
        "(it carries None, bool, int, float, str, bytes, list, tuple and dict)"
    )


def _boolean(instance: Any, attribute: attrs.Attribute[bool], value: Any) -> None:
    # Raise OptionError from validators: prefork words it as
    # "prefork.toml: serializer.use_bin_type = 'yes': must be true or false".
    if not isinstance(value, bool):
        raise OptionError(attribute.name, value, "must be true or false")


@attrs.frozen
class MsgpackSerializer:
    """msgpack: compact binary plain data; tuples arrive as lists, bytes stay bytes."""

    name: ClassVar[str] = "msgpack"
    #: Plain data only: errors travel as data and methods must be named.
    objects: ClassVar[bool] = False

    use_bin_type: bool = attrs.field(
        default=True,
        validator=_boolean,
        metadata={
            "doc": "encode bytes as msgpack bin (true), so bytes come back as bytes; false is the legacy raw format, where bytes do not survive"
        },
    )
    strict_map_key: bool = attrs.field(
        default=False,
        validator=_boolean,
        metadata={
            "doc": "when decoding, accept only str and bytes as dict keys (false also allows int, float, None and bool keys)"
        },
    )

    def dumps(self, obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=self.use_bin_type, default=_refuse)

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=self.strict_map_key)


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("serializer", MsgpackSerializer)
