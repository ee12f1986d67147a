"""The validated configuration: frozen attrs classes whose fields are the settings.

Validators raise :class:`prefork.errors.OptionError` (key, value, reason); the
loader adds the source of the value and the table, so a message reads
``prefork.toml: pool.task_timeout = -2.0: must be >= 0``.  Strategy options are
not declared here: they are the fields of the registered strategy classes.  The
validators and converters are kept in ``prefork.config._checks``, the TOML
emitter behind :meth:`Config.to_toml` in ``prefork.config._toml``; the names the
loader and the reference use are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import pluggy

from prefork.config._checks import (
    Validator,
    as_float,
    as_tuple,
    boolean,
    callable_spec,
    check_field,
    choice,
    doc,
    freeze,
    frozen_mapping,
    host_port,
    int_ge,
    int_le,
    is_int,
    is_list,
    is_number,
    nonempty_str,
    optional_host_port,
    plugin_list,
    read_only,
    seconds,
    signal_map,
    strategy_kind,
    string,
    title_template,
)
from prefork.config._toml import Unrepresentable, import_path, toml_assign, toml_key, toml_string, toml_value
from prefork.errors import ConfigError, OptionError
from prefork.strategies.registry import KINDS, StrategyRegistry, did_you_mean

__all__ = [
    "ALL_KEYS",
    "FORK_FROM",
    "TABLES",
    "TOP_LEVEL_KEYS",
    "WHEN_FULL",
    "BossWorkerConfig",
    "Config",
    "DispatcherConfig",
    "MPMConfig",
    "PoolConfig",
    "StrategySpec",
    "Unrepresentable",
    "check_field",
    "freeze",
    "import_path",
    "is_int",
    "is_number",
    "toml_assign",
    "toml_key",
    "toml_string",
    "toml_value",
]

#: Where workers are forked from.
FORK_FROM: Final = ("forkserver", "direct")
#: The scalar top-level keys, in the order files and docs list them.
TOP_LEVEL_KEYS: Final = ("profile", "name", "app", "plugins")
#: Every key allowed at the top level of a config file.
ALL_KEYS: Final = (*TOP_LEVEL_KEYS, "pool", "boss_worker", "dispatcher", "mpm", "control", *KINDS)


# -- the model ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PoolConfig:
    """The ``[pool]`` table: how workers are forked, fed, timed out and recycled."""

    fork_from: str = attrs.field(
        default="forkserver", validator=choice(FORK_FROM),
        metadata=doc("'forkserver': workers fork from a clean copy of the caller made when the pool starts; "
                      "'direct': the supervisor forks them itself"),
    )
    worker_title: str = attrs.field(
        default="{name} worker", validator=title_template,
        metadata=doc("process title of a worker; {name} is the config's name"),
    )
    max_tasks_per_child: int = attrs.field(
        default=0, validator=int_ge(0), metadata=doc("recycle a worker after this many tasks (0: never)")
    )
    max_tasks_jitter: int = attrs.field(
        default=0, validator=int_ge(0),
        metadata=doc("add 0..this many to each worker's max_tasks_per_child, so workers do not all recycle at once"),
    )
    max_rss_mb: float = attrs.field(
        default=0.0, converter=as_float, validator=seconds(0),
        metadata=doc("recycle a worker whose own memory (anonymous resident pages) grew by more than this many MiB since it booted "
                      "(counted from the lowest it has been since, so that inherited memory it frees hides no growth; heap its "
                      "parent freed is handed back at boot, so reusing it counts too): a task "
                      "worker finishes the tasks it holds first, a self-feeding one leaves at its next idle() (0: no limit)"),
    )
    max_worker_age: float = attrs.field(
        default=0.0, converter=as_float, validator=seconds(0),
        metadata=doc("recycle a task worker once it is this many seconds old, after the tasks it holds (0: never)"),
    )
    graceful_timeout: float = attrs.field(
        default=30.0, converter=as_float, validator=seconds(0, strict=True),
        metadata=doc("seconds a self-feeding worker told to leave (SIGTERM) may take before SIGKILL"),
    )
    task_timeout: float = attrs.field(
        default=0.0, converter=as_float, validator=seconds(0),
        metadata=doc("seconds a task may run before its worker is killed (0: no limit)"),
    )
    max_crash_retries: int = attrs.field(
        default=0, validator=int_ge(0),
        metadata=doc("run a task again when its worker died while running it, at most this often; then it "
                      "fails as a poison task (a task that never started is always re-dispatched)"),
    )
    kill_grace: float = attrs.field(
        default=1.0, converter=as_float, validator=seconds(0, strict=True),
        metadata=doc("seconds between SIGTERM and SIGKILL when a worker is stopped"),
    )
    boot_timeout: float = attrs.field(
        default=30.0, converter=as_float, validator=seconds(0, strict=True),
        metadata=doc("seconds a new worker may take to become ready"),
    )
    prefetch: int = attrs.field(
        default=0, validator=int_ge(0), metadata=doc("most tasks in flight per worker (0: automatic)")
    )
    max_boot_failures: int = attrs.field(
        default=5, validator=int_ge(1),
        metadata=doc("consecutive boot failures after which the pool is broken"),
    )
    initializer: str | Callable[..., Any] = attrs.field(
        default="", validator=callable_spec(allow_callable=True),
        metadata=doc("'module:callable' (or, from code, a callable) run in each new worker (\"\": none)",
                     "str | callable"),
    )
    initargs: tuple[Any, ...] = attrs.field(
        default=(), converter=as_tuple, validator=is_list, hash=False, metadata=doc("arguments passed to the initializer", "list")
    )
    finalizer: str | Callable[..., Any] = attrs.field(
        default="", validator=callable_spec(allow_callable=True),
        metadata=doc("'module:callable' (or, from code, a callable) run once in each worker as it leaves "
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
        default="", validator=callable_spec(allow_callable=True, in_worker=True),
        metadata=doc("'module:callable' (or, from code, a callable) run in a worker for each job", "str | callable"),
    )
    result_handler: str | Callable[..., Any] = attrs.field(
        default="", validator=callable_spec(allow_callable=True),
        metadata=doc("'module:callable' run in the caller on each result as get_result() returns it (\"\": none)",
                      "str | callable"),
    )
    ordered: bool = attrs.field(
        default=False, validator=boolean, metadata=doc("get_result() returns results in the order the jobs were added")
    )
    with_ids: bool = attrs.field(
        default=False, validator=boolean, metadata=doc("get_result() returns (job id, result) pairs; add_work() returns the ids")
    )
    max_pending: int = attrs.field(
        default=0, validator=int_ge(0), metadata=doc("most jobs waiting for a worker (0: no bound)")
    )
    when_full: str = attrs.field(
        default="block", validator=choice(WHEN_FULL),
        metadata=doc("what add_work() does at max_pending: 'block' until there is room, or 'raise' QueueFull"),
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
        default="PreforkDispatch", validator=nonempty_str, metadata=doc("the dispatcher's name in its log lines")
    )
    verbose: int = attrs.field(
        default=0, validator=int_ge(0),
        metadata=doc("0: warnings and errors reach talkback; 1: also forks and exits; 2: also every request"),
    )
    talkback: str | Callable[..., Any] = attrs.field(
        default="", validator=callable_spec(allow_callable=True),
        metadata=doc("'module:callable' (or a callable) given each log line (\"\": print to stdout)", "str | callable"),
    )
    xmlrpc_server_parent: str = attrs.field(
        default="", validator=string,
        metadata=doc("URL of an XML-RPC server asked for methods no map or class knows (\"\": none)"),
    )


@attrs.frozen(kw_only=True)
class MPMConfig:
    """The ``[mpm]`` table: what the MPM profile (``prefork.MPM``, ``prefork serve``)
    adds to the core.  The seed's spare-server options are the ``spare`` scaling
    policy's: ``start_servers``, ``min_spare`` (min_spare_servers), ``max_spare``
    (max_spare_servers) and ``max_servers``.  ``bind``, ``backlog``, ``read_timeout``,
    ``wsgi`` and the WSGI limits are ``prefork serve``'s alone: ``prefork.MPM`` and
    ``prefork run`` bind nothing and refuse them in one line rather than ignore them."""

    child_sigh: Mapping[str, Any] = attrs.field(
        factory=dict, converter=frozen_mapping, validator=signal_map, hash=False,
        metadata=doc("signal handlers installed in each child: {\"TERM INT\" = \"DEFAULT\", HUP = \"module:fn\"}; "
                      "values 'DEFAULT', 'IGNORE', 'module:callable' or (from code) a callable", "table"),
    )
    child_data_hook: str | Callable[..., Any] = attrs.field(
        default="", validator=callable_spec(allow_callable=True),
        metadata=doc("hook(pid, data, exitcode) for data the children send with yell() or exit() (\"\": none)",
                      "str | callable"),
    )
    data_hook_in_main: bool = attrs.field(
        default=False, validator=boolean,
        metadata=doc("run child_data_hook in the supervisor's process; false: in a dedicated process"),
    )
    bind: str = attrs.field(
        default="127.0.0.1:8000", validator=host_port,
        metadata=doc("host:port that `prefork serve` listens on (port 0: any free port)", serve_only=True),
    )
    backlog: int = attrs.field(
        default=128, validator=int_ge(1), metadata=doc("listen() backlog of `prefork serve`", serve_only=True),
    )
    read_timeout: float = attrs.field(
        default=30.0, converter=as_float, validator=seconds(0),
        metadata=doc("seconds a read or write on a `prefork serve` connection may wait: the socket timeout set "
                      "before handle(conn, addr), whose waits then raise TimeoutError (socket.timeout), so idle "
                      "clients cannot hold every child (0: none)", serve_only=True),
    )
    wsgi: str = attrs.field(
        default="", validator=callable_spec(allow_callable=False),
        metadata=doc("'module:app': `prefork serve` serves this WSGI application over HTTP/1.1 instead of calling "
                      "app(conn, addr) (\"\": not WSGI)", serve_only=True),
    )
    max_header_bytes: int = attrs.field(
        default=65536, validator=int_ge(256),
        metadata=doc("WSGI: most bytes of a request line and headers together; more is answered 431",
                     serve_only=True),
    )
    max_headers: int = attrs.field(
        default=100, validator=int_ge(1),
        metadata=doc("WSGI: most header fields in a request; more is answered 431", serve_only=True),
    )
    max_body: int = attrs.field(
        default=64 * 2**20, validator=int_ge(0),
        metadata=doc("WSGI: most bytes of a request body (declared or chunked); more is answered 413 (0: no limit)",
                     serve_only=True),
    )
    header_timeout: float = attrs.field(
        default=10.0, converter=as_float, validator=seconds(0, strict=True),
        metadata=doc("WSGI: seconds a client has to send a whole request line and headers (slowloris); then the "
                      "connection is closed (408 if it sent part of one)", serve_only=True),
    )
    keepalive_timeout: float = attrs.field(
        default=5.0, converter=as_float, validator=seconds(0),
        metadata=doc("WSGI: seconds an idle keep-alive connection waits for its next request (0: one request per "
                      "connection)", serve_only=True),
    )
    request_timeout: float = attrs.field(
        default=0.0, converter=as_float, validator=seconds(0),
        metadata=doc("harakiri: a child busy longer than this (one connection of handle(conn, addr), one request "
                      "of a WSGI app) is killed and replaced, its Python stack logged first (0: never)"),
    )


@attrs.frozen(kw_only=True)
class ControlConfig:
    """The ``[control]`` table: how an operator sees and steers a running pool
    (``prefork status``, ``prefork ctl``, metrics, the status page; docs/operations.md)."""

    enabled: bool = attrs.field(
        default=False, validator=boolean,
        metadata=doc("listen on a control socket named after the pool (`name`) for `prefork status` and "
                      "`prefork ctl`; `prefork run` and `prefork serve` turn it on unless set here"),
    )
    directory: str = attrs.field(
        default="", validator=attrs.validators.instance_of(str),
        metadata=doc("directory of the control sockets (\"\": $XDG_RUNTIME_DIR/prefork, else /tmp/prefork-<uid>)"),
    )
    timeout: float = attrs.field(
        default=2.0, converter=as_float, validator=seconds(0, strict=True),
        metadata=doc("seconds a control client may take to send its request"),
    )
    http: str = attrs.field(
        default="", validator=optional_host_port,
        metadata=doc("host:port of a live status page served by the pool (\"\": none); keep it on loopback"),
    )
    metrics_port: int = attrs.field(
        default=0, validator=[int_ge(0), int_le(65535)],
        metadata=doc("port of a Prometheus endpoint served by the pool (0: none; needs prefork[metrics])"),
    )
    metrics_addr: str = attrs.field(
        default="127.0.0.1", validator=nonempty_str,
        metadata=doc("address the Prometheus endpoint listens on"),
    )


#: The plain tables of a config file and the class of each.
TABLES: Final = {
    "pool": PoolConfig, "boss_worker": BossWorkerConfig, "dispatcher": DispatcherConfig, "mpm": MPMConfig,
    "control": ControlConfig,
}


@attrs.frozen(kw_only=True)
class StrategySpec:
    """One strategy section: which registered strategy, with which options."""

    kind: str = attrs.field(validator=strategy_kind, metadata=doc("the kind of strategy: " + ", ".join(KINDS)))
    name: str = attrs.field(validator=nonempty_str, metadata=doc("the registered strategy name"))
    options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=frozen_mapping, hash=False,
        metadata=doc("the strategy's options (its attrs fields), read-only"),
    )
    instance: Any = attrs.field(
        default=None, eq=False, hash=False, repr=False,
        metadata=doc("a strategy object given in code (then used as it is, by every pool of this config)"),
    )

    def create(self, registry: StrategyRegistry, where: str = "") -> Any:
        """A new strategy instance from the registry, or the object given in code."""
        if self.instance is not None:
            return self.instance
        return registry.create(self.kind, self.name, self.options, where or self.kind)


def _spec_of(kind: str) -> Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, StrategySpec) or value.kind != kind:
            raise OptionError(attribute.name, value, f"must be a StrategySpec of kind {kind!r}")

    return check


@attrs.frozen(kw_only=True)
class Config:
    """A whole, validated configuration; build it with :func:`prefork.config.load_config`,
    change it with :func:`attrs.evolve`."""

    profile: str = attrs.field(
        default="executor", validator=nonempty_str,
        metadata=doc("the packaged profile the settings start from (prefork/config/profiles/<profile>.toml)"),
    )
    name: str = attrs.field(
        default="prefork", validator=nonempty_str,
        metadata=doc("process title prefix: '<name> worker', '<name> forkserver'"),
    )
    app: str = attrs.field(
        default="", validator=callable_spec(allow_callable=False),
        metadata=doc("'module:callable' run by `prefork run` (\"\": none)"),
    )
    plugins: tuple[Any, ...] = attrs.field(
        default=(), converter=as_tuple, validator=plugin_list,
        metadata=doc("plugin modules to import and register, after the installed ones", "list[str]"),
    )
    pool: PoolConfig = attrs.field(
        factory=PoolConfig, validator=attrs.validators.instance_of(PoolConfig),
        metadata=doc("the [pool] table"),
    )
    boss_worker: BossWorkerConfig = attrs.field(
        factory=BossWorkerConfig, validator=attrs.validators.instance_of(BossWorkerConfig),
        metadata=doc("the [boss_worker] table"),
    )
    dispatcher: DispatcherConfig = attrs.field(
        factory=DispatcherConfig, validator=attrs.validators.instance_of(DispatcherConfig),
        metadata=doc("the [dispatcher] table"),
    )
    mpm: MPMConfig = attrs.field(
        factory=MPMConfig, validator=attrs.validators.instance_of(MPMConfig), metadata=doc("the [mpm] table"),
    )
    control: ControlConfig = attrs.field(
        factory=ControlConfig, validator=attrs.validators.instance_of(ControlConfig),
        metadata=doc("the [control] table"),
    )
    scaling: StrategySpec = attrs.field(validator=_spec_of("scaling"), metadata=doc("how many workers, when to fork and retire them"))
    transport: StrategySpec = attrs.field(validator=_spec_of("transport"), metadata=doc("how frames move between supervisor and worker"))
    serializer: StrategySpec = attrs.field(validator=_spec_of("serializer"), metadata=doc("how payloads become bytes"))
    resolver: StrategySpec = attrs.field(validator=_spec_of("resolver"), metadata=doc("how a method name becomes a callable in the worker"))
    sink: StrategySpec = attrs.field(validator=_spec_of("sink"), metadata=doc("where each task's outcome goes"))
    plugin_manager: pluggy.PluginManager = attrs.field(
        eq=False, repr=False, metadata=doc("the plugin manager built from the installed and listed plugins")
    )
    registry: StrategyRegistry = attrs.field(
        eq=False, repr=False, metadata=doc("the strategy registry the plugins filled")
    )
    sources: Mapping[str, str] = attrs.field(
        factory=dict, converter=read_only, eq=False, repr=False,
        metadata=doc("dotted key -> the layer that last set it: \"profile 'executor'\", a file path, "
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
