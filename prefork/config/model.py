"""The validated configuration: frozen attrs classes whose fields are the settings.

Validators raise :class:`prefork.errors.OptionError` (key, value, reason); the
loader adds the source of the value and the table, so a message reads
``prefork.toml: pool.task_timeout = -2.0: must be >= 0``.  Strategy options are
not declared here: they are the fields of the registered strategy classes.
"""

from __future__ import annotations

import datetime
import math
import re
import signal
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import pluggy

from prefork.errors import ConfigError, OptionError
from prefork.strategies.registry import KINDS, StrategyRegistry, did_you_mean

#: Where workers are forked from.
FORK_FROM: Final = ("forkserver", "direct")
#: The scalar top-level keys, in the order files and docs list them.
TOP_LEVEL_KEYS: Final = ("profile", "name", "app", "plugins")
#: Every key allowed at the top level of a config file.
ALL_KEYS: Final = (*TOP_LEVEL_KEYS, "pool", "boss_worker", "dispatcher", "mpm", *KINDS)

_CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


# -- value checks shared by fields and strategy options -------------------------------


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_ge(minimum: int) -> _Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_int(value):
            raise OptionError(attribute.name, value, "must be an integer")
        if value < minimum:
            raise OptionError(attribute.name, value, f"must be >= {minimum}")

    return check


def _as_float(value: Any) -> Any:
    """An int becomes a float; anything else is left for the validator to judge."""
    if is_int(value):
        try:
            return float(value)
        except OverflowError:
            return value
    return value


def _seconds(minimum: float, *, strict: bool = False) -> _Validator:
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


def _choice(choices: tuple[str, ...]) -> _Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            hint = did_you_mean(value, list(choices)) if isinstance(value, str) else ""
            raise OptionError(attribute.name, value, f"must be {' or '.join(map(repr, choices))}{hint}")

    return check


def _title_template(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(attribute.name, value, "must be a non-empty string")
    try:
        value.format(name="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise OptionError(attribute.name, value, f"must be a title with at most the field {{name}} ({exc!r})") from None


def _str(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise OptionError(attribute.name, value, "must be a string")


def _host_port(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    _, sep, port = str(value).rpartition(":")
    if not isinstance(value, str) or not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise OptionError(attribute.name, value, "must be 'host:port', e.g. '127.0.0.1:8000'")


def _bool(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(attribute.name, value, "must be true or false")


def _nonempty_str(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise OptionError(attribute.name, value, "must be a non-empty string")


def _callable_spec(*, allow_callable: bool) -> _Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if allow_callable and callable(value):
            return
        if isinstance(value, str) and (value == "" or _CALLABLE_SPEC.match(value)):
            return
        wanted = "'module:callable', a callable or \"\"" if allow_callable else "'module:callable' or \"\""
        raise OptionError(attribute.name, value, f"must be {wanted}")

    return check


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _is_list(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple):
        raise OptionError(attribute.name, value, "must be a list")


_NOT_PLUGINS = (bool, int, float, list, tuple, dict, type(None))


def _plugin_list(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
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


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType({k: freeze(v) for k, v in value.items()})


def _read_only(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


def _doc(text: str, type_name: str = "") -> dict[str, str]:
    """Field metadata: ``doc`` for the reference, and ``type`` where the annotation is not what a file holds."""
    return {"doc": text, "type": type_name} if type_name else {"doc": text}


# -- the model ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PoolConfig:
    """The ``[pool]`` table: how workers are forked, fed, timed out and recycled."""

    fork_from: str = attrs.field(
        default="forkserver", validator=_choice(FORK_FROM),
        metadata=_doc("'forkserver': workers fork from a clean copy of the caller made when the pool starts; "
                      "'direct': the supervisor forks them itself"),
    )
    worker_title: str = attrs.field(
        default="{name} worker", validator=_title_template,
        metadata=_doc("process title of a worker; {name} is the config's name"),
    )
    max_tasks_per_child: int = attrs.field(
        default=0, validator=_int_ge(0), metadata=_doc("recycle a worker after this many tasks (0: never)")
    )
    max_tasks_jitter: int = attrs.field(
        default=0, validator=_int_ge(0),
        metadata=_doc("add 0..this many to each worker's max_tasks_per_child, so workers do not all recycle at once"),
    )
    max_rss_mb: float = attrs.field(
        default=0.0, converter=_as_float, validator=_seconds(0),
        metadata=_doc("recycle a worker whose own memory (anonymous resident pages) grew by more than this many MiB since it booted: a task "
                      "worker finishes the tasks it holds first, a self-feeding one leaves at its next idle() (0: no limit)"),
    )
    max_worker_age: float = attrs.field(
        default=0.0, converter=_as_float, validator=_seconds(0),
        metadata=_doc("recycle a task worker once it is this many seconds old, after the tasks it holds (0: never)"),
    )
    graceful_timeout: float = attrs.field(
        default=30.0, converter=_as_float, validator=_seconds(0, strict=True),
        metadata=_doc("seconds a self-feeding worker told to leave (SIGTERM) may take before SIGKILL"),
    )
    task_timeout: float = attrs.field(
        default=0.0, converter=_as_float, validator=_seconds(0),
        metadata=_doc("seconds a task may run before its worker is killed (0: no limit)"),
    )
    max_crash_retries: int = attrs.field(
        default=0, validator=_int_ge(0),
        metadata=_doc("run a task again when its worker died while running it, at most this often; then it "
                      "fails as a poison task (a task that never started is always re-dispatched)"),
    )
    kill_grace: float = attrs.field(
        default=1.0, converter=_as_float, validator=_seconds(0, strict=True),
        metadata=_doc("seconds between SIGTERM and SIGKILL when a worker is stopped"),
    )
    boot_timeout: float = attrs.field(
        default=30.0, converter=_as_float, validator=_seconds(0, strict=True),
        metadata=_doc("seconds a new worker may take to become ready"),
    )
    prefetch: int = attrs.field(
        default=0, validator=_int_ge(0), metadata=_doc("most tasks in flight per worker (0: automatic)")
    )
    max_boot_failures: int = attrs.field(
        default=5, validator=_int_ge(1),
        metadata=_doc("consecutive boot failures after which the pool is broken"),
    )
    initializer: str | Callable[..., Any] = attrs.field(
        default="", validator=_callable_spec(allow_callable=True),
        metadata=_doc("'module:callable' (or, from code, a callable) run in each new worker (\"\": none)",
                     "str | callable"),
    )
    initargs: tuple[Any, ...] = attrs.field(
        default=(), converter=_as_tuple, validator=_is_list, hash=False, metadata=_doc("arguments passed to the initializer", "list")
    )
    finalizer: str | Callable[..., Any] = attrs.field(
        default="", validator=_callable_spec(allow_callable=True),
        metadata=_doc("'module:callable' (or, from code, a callable) run once in each worker as it leaves "
                      "on its own: stopped, recycled, or at the end of its channel (\"\": none)", "str | callable"),
    )

    def __attrs_post_init__(self) -> None:
        if self.prefetch and self.max_tasks_per_child and self.prefetch > self.max_tasks_per_child:
            raise OptionError(
                "prefetch", self.prefetch, f"must be <= max_tasks_per_child ({self.max_tasks_per_child})"
            )


WHEN_FULL: Final = ("block", "raise")


@attrs.frozen(kw_only=True)
class BossWorkerConfig:
    """The ``[boss_worker]`` table: the job handlers of the boss-worker profile
    (``prefork.BossWorker``).  Its other seed options live where the core keeps
    them: ``init_handler`` is ``pool.initializer``, ``exit_handler`` is
    ``pool.finalizer``, ``global_timeout`` is ``pool.task_timeout`` and
    ``worker_count`` is ``scaling.workers``."""

    work_handler: str | Callable[..., Any] = attrs.field(
        default="", validator=_callable_spec(allow_callable=True),
        metadata=_doc("'module:callable' (or, from code, a callable) run in a worker for each job", "str | callable"),
    )
    result_handler: str | Callable[..., Any] = attrs.field(
        default="", validator=_callable_spec(allow_callable=True),
        metadata=_doc("'module:callable' run in the caller on each result as get_result() returns it (\"\": none)",
                      "str | callable"),
    )
    ordered: bool = attrs.field(
        default=False, validator=_bool, metadata=_doc("get_result() returns results in the order the jobs were added")
    )
    with_ids: bool = attrs.field(
        default=False, validator=_bool, metadata=_doc("get_result() returns (job id, result) pairs; add_work() returns the ids")
    )
    max_pending: int = attrs.field(
        default=0, validator=_int_ge(0), metadata=_doc("most jobs waiting for a worker (0: no bound)")
    )
    when_full: str = attrs.field(
        default="block", validator=_choice(WHEN_FULL),
        metadata=_doc("what add_work() does at max_pending: 'block' until there is room, or 'raise' QueueFull"),
    )


@attrs.frozen(kw_only=True)
class DispatcherConfig:
    """The ``[dispatcher]`` table: what the dispatcher profile (``prefork.Dispatcher``)
    adds to the core.  The seed's other options live where the core keeps them:
    ``methods`` and ``classes`` are ``resolver.methods`` and ``resolver.classes``,
    ``upon_result`` is ``sink.callback``, ``max_forks``, ``pre_fork`` and the spawn
    delay are ``scaling.*``, ``max_requests`` is ``pool.max_tasks_per_child`` and
    ``fork_name`` is ``name``."""

    alias: str = attrs.field(
        default="PreforkDispatch", validator=_nonempty_str, metadata=_doc("the dispatcher's name in its log lines")
    )
    verbose: int = attrs.field(
        default=0, validator=_int_ge(0),
        metadata=_doc("0: warnings and errors reach talkback; 1: also forks and exits; 2: also every request"),
    )
    talkback: str | Callable[..., Any] = attrs.field(
        default="", validator=_callable_spec(allow_callable=True),
        metadata=_doc("'module:callable' (or a callable) given each log line (\"\": print to stdout)", "str | callable"),
    )
    xmlrpc_server_parent: str = attrs.field(
        default="", validator=_str,
        metadata=_doc("URL of an XML-RPC server asked for methods no map or class knows (\"\": none)"),
    )


def _signal_map(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise OptionError(attribute.name, value, "must be a table of signal names to handlers")
    for key, handler in value.items():
        for name in str(key).split():
            full = name if name.startswith("SIG") else f"SIG{name}"
            if not hasattr(signal, full) or full in ("SIGKILL", "SIGSTOP"):
                raise OptionError(f"{attribute.name}.{key}", handler, f"{name!r} is not a signal a handler can be set for")
        if not (callable(handler) or isinstance(handler, str)):
            raise OptionError(f"{attribute.name}.{key}", handler, "must be a callable, 'DEFAULT', 'IGNORE' or 'module:callable'")


@attrs.frozen(kw_only=True)
class MPMConfig:
    """The ``[mpm]`` table: what the MPM profile (``prefork.MPM``, ``prefork serve``)
    adds to the core.  The seed's spare-server options are the ``spare`` scaling
    policy's: ``start_servers``, ``min_spare`` (min_spare_servers), ``max_spare``
    (max_spare_servers) and ``max_servers``."""

    child_sigh: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_frozen_mapping, validator=_signal_map, hash=False,
        metadata=_doc("signal handlers installed in each child: {\"TERM INT\" = \"DEFAULT\", HUP = \"module:fn\"}; "
                      "values 'DEFAULT', 'IGNORE', 'module:callable' or (from code) a callable", "table"),
    )
    child_data_hook: str | Callable[..., Any] = attrs.field(
        default="", validator=_callable_spec(allow_callable=True),
        metadata=_doc("hook(pid, data, exitcode) for data the children send with yell() or exit() (\"\": none)",
                      "str | callable"),
    )
    data_hook_in_main: bool = attrs.field(
        default=False, validator=_bool,
        metadata=_doc("run child_data_hook in the supervisor's process; false: in a dedicated process"),
    )
    bind: str = attrs.field(
        default="127.0.0.1:8000", validator=_host_port,
        metadata=_doc("host:port that `prefork serve` listens on (port 0: any free port)"),
    )
    backlog: int = attrs.field(default=128, validator=_int_ge(1), metadata=_doc("listen() backlog of `prefork serve`"))
    read_timeout: float = attrs.field(
        default=30.0, converter=_as_float, validator=_seconds(0),
        metadata=_doc("seconds a read or write on a `prefork serve` connection may wait: the socket timeout set "
                      "before handle(conn, addr), whose waits then raise TimeoutError (socket.timeout), so idle "
                      "clients cannot hold every child (0: none)"),
    )


#: The plain tables of a config file and the class of each.
TABLES: Final = {"pool": PoolConfig, "boss_worker": BossWorkerConfig, "dispatcher": DispatcherConfig, "mpm": MPMConfig}


def _kind(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in KINDS:
        raise OptionError(attribute.name, value, f"must be one of {', '.join(KINDS)}")


@attrs.frozen(kw_only=True)
class StrategySpec:
    """One strategy section: which registered strategy, with which options."""

    kind: str = attrs.field(validator=_kind, metadata=_doc("the kind of strategy: " + ", ".join(KINDS)))
    name: str = attrs.field(validator=_nonempty_str, metadata=_doc("the registered strategy name"))
    options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_frozen_mapping, hash=False,
        metadata=_doc("the strategy's options (its attrs fields), read-only"),
    )
    instance: Any = attrs.field(
        default=None, eq=False, hash=False, repr=False,
        metadata=_doc("a strategy object given in code (then used as it is, by every pool of this config)"),
    )

    def create(self, registry: StrategyRegistry, where: str = "") -> Any:
        """A new strategy instance from the registry, or the object given in code."""
        if self.instance is not None:
            return self.instance
        return registry.create(self.kind, self.name, self.options, where or self.kind)


def _spec_of(kind: str) -> _Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, StrategySpec) or value.kind != kind:
            raise OptionError(attribute.name, value, f"must be a StrategySpec of kind {kind!r}")

    return check


@attrs.frozen(kw_only=True)
class Config:
    """A whole, validated configuration; build it with :func:`prefork.config.load_config`,
    change it with :func:`attrs.evolve`."""

    profile: str = attrs.field(
        default="executor", validator=_nonempty_str,
        metadata=_doc("the packaged profile the settings start from (prefork/config/profiles/<profile>.toml)"),
    )
    name: str = attrs.field(
        default="prefork", validator=_nonempty_str,
        metadata=_doc("process title prefix: '<name> worker', '<name> forkserver'"),
    )
    app: str = attrs.field(
        default="", validator=_callable_spec(allow_callable=False),
        metadata=_doc("'module:callable' run by `prefork run` (\"\": none)"),
    )
    plugins: tuple[Any, ...] = attrs.field(
        default=(), converter=_as_tuple, validator=_plugin_list,
        metadata=_doc("plugin modules to import and register, after the installed ones", "list[str]"),
    )
    pool: PoolConfig = attrs.field(
        factory=PoolConfig, validator=attrs.validators.instance_of(PoolConfig),
        metadata=_doc("the [pool] table"),
    )
    boss_worker: BossWorkerConfig = attrs.field(
        factory=BossWorkerConfig, validator=attrs.validators.instance_of(BossWorkerConfig),
        metadata=_doc("the [boss_worker] table"),
    )
    dispatcher: DispatcherConfig = attrs.field(
        factory=DispatcherConfig, validator=attrs.validators.instance_of(DispatcherConfig),
        metadata=_doc("the [dispatcher] table"),
    )
    mpm: MPMConfig = attrs.field(
        factory=MPMConfig, validator=attrs.validators.instance_of(MPMConfig), metadata=_doc("the [mpm] table"),
    )
    scaling: StrategySpec = attrs.field(validator=_spec_of("scaling"), metadata=_doc("how many workers, when to fork and retire them"))
    transport: StrategySpec = attrs.field(validator=_spec_of("transport"), metadata=_doc("how frames move between supervisor and worker"))
    serializer: StrategySpec = attrs.field(validator=_spec_of("serializer"), metadata=_doc("how payloads become bytes"))
    resolver: StrategySpec = attrs.field(validator=_spec_of("resolver"), metadata=_doc("how a method name becomes a callable in the worker"))
    sink: StrategySpec = attrs.field(validator=_spec_of("sink"), metadata=_doc("where each task's outcome goes"))
    plugin_manager: pluggy.PluginManager = attrs.field(
        eq=False, repr=False, metadata=_doc("the plugin manager built from the installed and listed plugins")
    )
    registry: StrategyRegistry = attrs.field(
        eq=False, repr=False, metadata=_doc("the strategy registry the plugins filled")
    )
    sources: Mapping[str, str] = attrs.field(
        factory=dict, converter=_read_only, eq=False, repr=False,
        metadata=_doc("dotted key -> the layer that last set it: \"profile 'executor'\", a file path, "
                      "'keyword arguments'"),
    )

    def __attrs_post_init__(self) -> None:
        for kind in KINDS:  # catches a bad attrs.evolve; load_config already checked with sources
            self.create(kind)

    def spec(self, kind: str) -> StrategySpec:
        """The :class:`StrategySpec` of ``kind`` (one of ``KINDS``)."""
        if kind not in KINDS:
            raise ConfigError(f"unknown strategy kind {kind!r}{did_you_mean(kind, list(KINDS))}; "
                              f"kinds are {', '.join(KINDS)}")
        spec: StrategySpec = getattr(self, kind)
        return spec

    def create(self, kind: str) -> Any:
        """A new instance of the configured ``kind`` strategy, each call."""
        return self.spec(kind).create(self.registry)

    def require(self, kind: str, name: str, honoured: tuple[str, ...] = (), by: str = "") -> None:
        """A facade that fixes the ``kind`` strategy to ``name`` refuses a config that asks
        for another, or for an option of it the facade does not honour: never ignored."""
        spec = self.spec(kind)
        by = by or f"the {self.profile} profile"
        if spec.name != name:
            where = self.sources.get(f"{kind}.name", "config")
            raise ConfigError(f"{where}: {kind}.name = {spec.name!r}: {by} works with its own {name!r} {kind} "
                              f"and cannot use another; remove [{kind}] from the config")
        ignored = sorted(set(spec.options) - set(honoured))
        if ignored:
            key = f"{kind}.{ignored[0]}"
            raise ConfigError(f"{self.sources.get(key, 'config')}: {key} = {spec.options[ignored[0]]!r}: "
                              f"{by} does not take this option from the config"
                              + (f" (it takes: {', '.join(honoured)})" if honoured else ""))

    def to_toml(self) -> str:
        """The whole configuration as TOML text that :func:`load_config` reads back."""
        lines = [toml_assign(key, getattr(self, key)) for key in TOP_LEVEL_KEYS]
        for table, cls in TABLES.items():
            lines += ["", f"[{table}]"]
            lines += [toml_assign(f.name, getattr(getattr(self, table), f.name)) for f in attrs.fields(cls)]
        for kind in KINDS:
            spec = self.spec(kind)
            lines += ["", f"[{kind}]", toml_assign("name", spec.name)]
            lines += [toml_assign(key, value) for key, value in spec.options.items()]
        return "\n".join(lines) + "\n"


# -- a tiny TOML emitter -----------------------------------------------------------------


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
