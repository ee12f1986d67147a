"""prefork.config: layering, error messages, plugins, TOML output and the generated reference."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork.config import Config, PoolConfig, StrategySpec, load_config, profile_names
from prefork.config.model import FORK_FROM
from prefork.config.reference import EXAMPLE_TOML, REGENERATE, render_reference
from prefork.errors import ConfigError, PluginError
from prefork.plugins import build_plugin_manager, build_registry
from prefork.strategies.resolver import ChainResolver, MethodsResolver
from prefork.strategies.scaling import FixedPolicy, OnDemandPolicy, SparePolicy
from prefork.strategies.serializer import CloudpickleSerializer
from prefork.strategies.sink import CallbackSink, FutureSink, QueueSink
from prefork.strategies.transport import PipeTransport

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFORK_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)


def write(text: str, name: str = "prefork.toml") -> str:
    Path(name).write_text(textwrap.dedent(text), encoding="utf-8")
    return name


def error_of(text: str | None = None, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(text) if text is not None else None, overrides)
    return str(info.value)


def add(a: int, b: int) -> int:
    return a + b


# -- defaults and profiles -------------------------------------------------------------


def test_defaults_are_the_executor_profile() -> None:
    cfg = load_config()
    assert (cfg.profile, cfg.name, cfg.app, cfg.plugins) == ("executor", "prefork", "", ())
    assert cfg.pool == PoolConfig()
    assert cfg.scaling == StrategySpec(kind="scaling", name="fixed", options={"workers": 0})
    assert [cfg.spec(k).name for k in ("transport", "serializer", "resolver", "sink")] == [
        "pipe", "cloudpickle", "chain", "future"]
    assert cfg.create("scaling") == FixedPolicy(workers=0)
    assert isinstance(cfg.create("transport"), PipeTransport)
    assert isinstance(cfg.create("serializer"), CloudpickleSerializer)
    assert isinstance(cfg.create("resolver"), ChainResolver)
    assert isinstance(cfg.create("sink"), FutureSink)
    assert cfg.create("sink") is not cfg.create("sink")  # a new instance each call
    assert cfg.registry.names("scaling") == ["backlog", "fixed", "on-demand", "spare"]
    assert cfg.plugin_manager.get_plugin("prefork.strategies.scaling") is not None
    assert cfg.sources["scaling.workers"] == "profile 'executor'"


def test_the_executor_profile_spells_out_the_pool_defaults() -> None:
    cfg = load_config()
    assert {k for k, v in cfg.sources.items() if k.startswith("pool.") and v == "profile 'executor'"} == {
        f"pool.{f.name}" for f in attrs.fields(PoolConfig)}


@pytest.mark.parametrize(
    ("profile", "scaling", "sink"),
    [
        ("executor", FixedPolicy(workers=0), FutureSink),
        ("dispatcher", OnDemandPolicy(pre_fork=2, max_forks=4, spawn_delay=2.0), CallbackSink),
        ("mpm", SparePolicy(start_servers=5, min_spare=5, max_spare=10, max_servers=73), CallbackSink),
        ("boss-worker", FixedPolicy(workers=3), QueueSink),
    ],
)
def test_profiles(profile: str, scaling: object, sink: type) -> None:
    assert profile in profile_names()
    cfg = load_config(overrides={"profile": profile})
    assert cfg.profile == profile
    assert cfg.create("scaling") == scaling
    assert isinstance(cfg.create("sink"), sink)
    assert cfg.resolver.name == "chain"


# -- layering ------------------------------------------------------------------------------


def test_profile_then_file_then_overrides() -> None:
    path = write("""
        name = "svc"
        [pool]
        prefetch = 2
        task_timeout = 5
        [scaling]
        workers = 3
    """)
    cfg = load_config(path)
    assert (cfg.name, cfg.pool.prefetch, cfg.pool.task_timeout, cfg.scaling.options["workers"]) == ("svc", 2, 5.0, 3)
    assert cfg.pool.kill_grace == 1.0  # from the profile
    cfg = load_config(path, {"scaling.workers": 5, "pool": {"task_timeout": 1.5}, "name": "kw"})
    assert (cfg.name, cfg.pool.prefetch, cfg.pool.task_timeout, cfg.scaling.options["workers"]) == ("kw", 2, 1.5, 5)
    assert cfg.sources["pool.prefetch"] == "prefork.toml"
    assert cfg.sources["scaling.workers"] == "keyword arguments"
    assert cfg.sources["pool.kill_grace"] == "profile 'executor'"


def test_profile_is_chosen_by_overrides_then_file() -> None:
    path = write('profile = "mpm"\n')
    assert load_config(path).profile == "mpm"
    assert load_config(path).scaling.name == "spare"
    cfg = load_config(path, {"profile": "boss-worker"})
    assert (cfg.profile, cfg.scaling.options["workers"], cfg.sink.name) == ("boss-worker", 3, "queue")


def test_same_strategy_name_layers_its_options() -> None:
    cfg = load_config(write('profile = "mpm"\n[scaling]\nname = "spare"\nmax_spare = 20\n'))
    assert dict(cfg.scaling.options) == {"start_servers": 5, "min_spare": 5, "max_spare": 20, "max_servers": 73}


def test_string_shorthand_for_a_strategy() -> None:
    cfg = load_config(write('serializer = "json"\nscaling = "fixed"\n'))
    assert cfg.serializer == StrategySpec(kind="serializer", name="json")
    assert cfg.scaling.options == {"workers": 0}  # same name: the profile's options stay
    assert load_config(overrides={"sink": "queue"}).sink.name == "queue"


def test_switching_the_strategy_drops_the_earlier_options() -> None:
    cfg = load_config(write('[scaling]\nname = "spare"\nmax_spare = 20\n'))
    assert dict(cfg.scaling.options) == {"max_spare": 20}  # not the profile's `workers`
    assert cfg.create("scaling") == SparePolicy(max_spare=20)
    cfg = load_config(write('[scaling]\nworkers = 3\n'), {"scaling.name": "on-demand"})
    assert dict(cfg.scaling.options) == {}
    cfg = load_config(overrides={"scaling": "spare", "scaling.max_servers": 9})
    assert dict(cfg.scaling.options) == {"max_servers": 9}


def test_python_objects_as_overrides() -> None:
    cfg = load_config(overrides={
        "pool.initializer": add,
        "pool.initargs": [1, 2],
        "resolver": {"name": "methods", "methods": {"add": add, "neg": "operator:neg"}},
    })
    assert cfg.pool.initializer is add and cfg.pool.initargs == (1, 2)
    resolver = cfg.create("resolver")
    assert isinstance(resolver, MethodsResolver)
    assert resolver.resolve("add") is add
    text = cfg.to_toml()
    assert f'initializer = "{__name__}:add"' in text
    assert f'methods = {{ add = "{__name__}:add", neg = "operator:neg" }}' in text
    assert "# initializer:" in load_config(overrides={"pool.initializer": lambda: None}).to_toml()


def test_config_is_frozen_and_evolves_with_validation() -> None:
    cfg = load_config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.scaling.options["workers"] = 3  # type: ignore[index]
    assert cfg == load_config() and hash(cfg) == hash(load_config())
    changed = attrs.evolve(cfg, scaling=StrategySpec(kind="scaling", name="fixed", options={"workers": 7}))
    assert changed.create("scaling") == FixedPolicy(workers=7) and changed.registry is cfg.registry
    with pytest.raises(ConfigError, match=r"^scaling\.workers = -1: must be >= 0$"):
        attrs.evolve(cfg, scaling=StrategySpec(kind="scaling", name="fixed", options={"workers": -1}))
    with pytest.raises(ConfigError, match="did you mean 'sink'"):
        cfg.create("snk")


# -- error messages (golden) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[scaling]\nname = "spare"\nmax_spare = -1\n', "prefork.toml: scaling.max_spare = -1: must be >= 1"),
        ("[pool]\ntask_timeout = -2.0\n", "prefork.toml: pool.task_timeout = -2.0: must be >= 0"),
        ("[pool]\nkill_grace = 0\n", "prefork.toml: pool.kill_grace = 0.0: must be > 0"),
        ("[pool]\nboot_timeout = inf\n", "prefork.toml: pool.boot_timeout = inf: must be a finite number"),
        ("[pool]\nmax_task_per_child = 3\n",
         "prefork.toml: pool.max_task_per_child: unknown key; did you mean 'max_tasks_per_child'?"),
        ('nmae = "x"\n', "prefork.toml: nmae: unknown key; did you mean 'name'?"),
        ("[scaling]\nworker = 3\n",
         "prefork.toml: scaling.worker: unknown option; did you mean 'workers'? (options of 'fixed': workers)"),
        ('[pool]\nprefetch = "2"\n', "prefork.toml: pool.prefetch = '2': must be an integer"),
        ("[pool]\nprefetch = true\n", "prefork.toml: pool.prefetch = True: must be an integer"),
        ("[pool]\nmax_boot_failures = 0\n", "prefork.toml: pool.max_boot_failures = 0: must be >= 1"),
        ('[pool]\ntask_timeout = "1"\n', "prefork.toml: pool.task_timeout = '1': must be a number"),
        ('[pool]\nfork_from = "forkservr"\n',
         "prefork.toml: pool.fork_from = 'forkservr': must be 'forkserver' or 'direct'; did you mean 'forkserver'?"),
        ("[pool]\nmax_tasks_per_child = 2\nprefetch = 3\n",
         "prefork.toml: pool.prefetch = 3: must be <= max_tasks_per_child (2)"),
        ("[pool]\ninitargs = 3\n", "prefork.toml: pool.initargs = 3: must be a list"),
        ('[pool]\ninitializer = "nocolon"\n',
         "prefork.toml: pool.initializer = 'nocolon': must be 'module:callable', a callable or \"\""),
        ('[scaling]\nworkers = "4"\n', "prefork.toml: scaling.workers = '4': must be an integer"),
        ("[transport]\nread_size = true\n", "prefork.toml: transport.read_size = True: must be an integer"),
        ('[serializer]\nalways = "yes"\n', "prefork.toml: serializer.always = 'yes': must be true or false"),
        ('profile = "dispatcher"\n[scaling]\npre_fork = 5\n',
         "prefork.toml: scaling.pre_fork = 5: must be <= max_forks (4)"),
        ('[scaling]\nname = "on-demand"\nspawn_delay = "soon"\n',
         "prefork.toml: scaling.spawn_delay = 'soon': must be a number"),
        ('transport = "pip"\n',
         "prefork.toml: transport.name = 'pip': unknown transport strategy; did you mean 'pipe'? (known: pipe)"),
        ("transport = 3\n", "prefork.toml: transport = 3: must be a table or a strategy name"),
        ("pool = 1\n", "prefork.toml: pool = 1: must be a table"),
        ('name = ""\n', "prefork.toml: name = '': must be a non-empty string"),
        ('app = "main"\n', "prefork.toml: app = 'main': must be 'module:callable' or \"\""),
        ('plugins = "x"\n', "prefork.toml: plugins = 'x': must be a list of plugin module names"),
        ('[resolver]\nname = "methods"\nmethods = { add = 3 }\n',
         "prefork.toml: resolver.methods.add = 3: must be a callable or a 'module:callable' string"),
        ('profile = "exector"\n',
         "prefork.toml: profile = 'exector': unknown profile; did you mean 'executor'? "
         "(available: boss-worker, dispatcher, executor, mpm)"),
        ("[pool\n", "prefork.toml: invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 6)"),
        ("a = 1\na = 2\n", "prefork.toml: invalid TOML: Cannot overwrite a value (at line 2, column 6)"),
    ],
)
def test_file_errors(text: str, message: str) -> None:
    assert error_of(text) == message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scaling.workers": -1}, "keyword arguments: scaling.workers = -1: must be >= 0"),
        ({"pool": {"prefetch": -3}}, "keyword arguments: pool.prefetch = -3: must be >= 0"),
        ({"pool.initializer": 3},
         "keyword arguments: pool.initializer = 3: must be 'module:callable', a callable or \"\""),
        ({"profile": "mmp"}, "keyword arguments: profile = 'mmp': unknown profile; did you mean 'mpm'? "
         "(available: boss-worker, dispatcher, executor, mpm)"),
        ({"pool.nope": 1}, "keyword arguments: pool.nope: unknown key"),
        ({"name": "x", "name.y": 1}, "keyword arguments: name = 'x': must be a table to set name.y"),
        ({"scaling.name": 3}, "keyword arguments: scaling.name = 3: must be a strategy name (known: backlog, fixed, on-demand, spare)"),
        ({"sink": {"name": "callback", "callback": "no_such_mod_x:fn"}},
         "keyword arguments: sink: cannot create the sink strategy 'callback': No module named 'no_such_mod_x'"),
        ({"pool..x": 1},
         "keyword arguments: 'pool..x': a key must be a name or a dotted path such as 'pool.prefetch'"),
        # the bad value is the profile's: the message says so
        ({"profile": "mpm", "scaling.max_servers": 3},
         "profile 'mpm': scaling.start_servers = 5: must be <= max_servers (3)"),
    ],
)
def test_override_errors(overrides: dict[str, Any], message: str) -> None:
    assert error_of(None, overrides) == message


def test_file_value_error_names_the_path_as_given(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    write("[pool]\nprefetch = -1\n", "conf/app.toml")
    with pytest.raises(ConfigError, match=r"^conf/app\.toml: pool\.prefetch = -1: must be >= 0$"):
        load_config(Path("conf/app.toml"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nowhere.toml")
    assert str(info.value) == "nowhere.toml: cannot read the config file: No such file or directory"


# -- plugins -------------------------------------------------------------------------------

PLUGIN = '''
from typing import ClassVar

import attrs

from prefork import hookimpl
from prefork.errors import OptionError
from prefork.strategies.transport import PipeTransport


def _even(instance, attribute, value):
    if value % 2:
        raise OptionError(attribute.name, value, "must be even")


@attrs.frozen
class MineTransport(PipeTransport):
    """A pipe with a twist."""

    name: ClassVar[str] = "mine"
    twist: int = attrs.field(default=2, validator=_even, metadata={"doc": "how much twist"})


@hookimpl
def prefork_register_strategies(registry):
    registry.register("transport", MineTransport)
'''


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"cfg_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_listed_plugin_registers_a_strategy(plugin_module: str) -> None:
    cfg = load_config(write(f'plugins = ["{plugin_module}"]\ntransport = "mine"\n'))
    assert cfg.plugins == (plugin_module,)
    assert cfg.registry.names("transport") == ["mine", "pipe"]
    transport = cfg.create("transport")
    assert type(transport).__name__ == "MineTransport" and transport.twist == 2
    cfg = load_config(overrides={"plugins": [plugin_module], "transport": {"name": "mine", "twist": 4}})
    assert cfg.create("transport").twist == 4
    assert error_of(f'plugins = ["{plugin_module}"]\n[transport]\nname = "mine"\ntwist = 3\n') == (
        "prefork.toml: transport.twist = 3: must be even")
    assert error_of('transport = "mine"\n') == (
        "prefork.toml: transport.name = 'mine': unknown transport strategy (known: pipe)")


def test_a_plugin_that_cannot_be_imported() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write('plugins = ["no_such_prefork_plugin"]\n'))
    assert str(info.value) == (
        "prefork.toml: plugins = [...]: cannot import plugin module 'no_such_prefork_plugin': "
        "No module named 'no_such_prefork_plugin'")
    assert isinstance(info.value.__cause__, PluginError)


# -- TOML output ---------------------------------------------------------------------------


def test_to_toml_round_trips_a_whole_config() -> None:
    cfg = load_config(overrides={
        "profile": "mpm", "name": 'we"ird\tname', "app": "pkg.app:main",
        "resolver": {"name": "chain", "methods": {"a.b": "operator:add"}, "classes": ["os"], "imports": False},
        "sink.callback": "operator:truth",
    })
    text = cfg.to_toml()
    again = load_config(write(text))
    assert again == cfg
    assert again.to_toml() == text


def test_the_worked_example_loads() -> None:
    cfg = load_config(write(EXAMPLE_TOML))
    assert (cfg.profile, cfg.name, cfg.serializer.name, cfg.resolver.name) == ("mpm", "imgserver", "pickle", "methods")
    assert cfg.scaling.options == {"start_servers": 5, "min_spare": 5, "max_spare": 20, "max_servers": 100}
    assert cfg.pool.initargs == ("/var/cache/imgserver",)


toml_scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.booleans()
)


def _consistent(pool: dict[str, Any]) -> bool:
    return not (pool["prefetch"] and pool["max_tasks_per_child"] and pool["prefetch"] > pool["max_tasks_per_child"])


pool_values: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries({
    "fork_from": st.sampled_from(FORK_FROM),
    "max_tasks_per_child": st.integers(0, 2**63 - 1),
    "task_timeout": st.floats(0, 1e12) | st.integers(0, 10**6),
    "kill_grace": st.floats(0, 1e12, exclude_min=True),
    "boot_timeout": st.floats(0, 1e12, exclude_min=True),
    "prefetch": st.integers(0, 1000),
    "max_boot_failures": st.integers(1, 2**63 - 1),
    "initializer": st.sampled_from(["", "os:getpid", "pkg.mod:Class.method"]),
    "initargs": st.lists(toml_scalars | st.lists(toml_scalars, max_size=3), max_size=4),
}).filter(_consistent)


@FIXTURE_SETTINGS
@given(values=pool_values)
def test_pool_values_round_trip_through_toml(values: dict[str, Any]) -> None:
    cfg = load_config(overrides={"pool": values})
    again = load_config(write(cfg.to_toml()))
    assert again == cfg
    assert again.pool == PoolConfig(**values)


INT_KEYS = ["pool.max_tasks_per_child", "pool.prefetch", "pool.max_boot_failures", "scaling.workers",
            "transport.read_size", "transport.max_frame", "transport.buffer_size"]


@FIXTURE_SETTINGS
@given(key=st.sampled_from(INT_KEYS), value=st.integers(max_value=-1), from_file=st.booleans())
def test_negative_ints_are_errors_naming_the_key(key: str, value: int, from_file: bool) -> None:
    table, option = key.split(".")
    if from_file:
        message = error_of(f"[{table}]\n{option} = {value}\n")
        assert message.startswith(f"prefork.toml: {key} = {value}: must be >= ")
    else:
        message = error_of(None, {key: value})
        assert message.startswith(f"keyword arguments: {key} = {value}: must be >= ")


# -- the generated reference ---------------------------------------------------------------


def test_reference_lists_every_setting() -> None:
    text = render_reference(load_config().registry)
    for f in attrs.fields(PoolConfig):
        assert f"| `{f.name}` |" in text
    for key in ("profile", "name", "app", "plugins", "workers", "max_spare", "read_size", "always", "callback"):
        assert f"| `{key}` |" in text
    for name in profile_names():
        assert f"### `{name}`" in text


def test_docs_configuration_md_is_current() -> None:
    text = render_reference(build_registry(build_plugin_manager(autoload=False)))
    path = ROOT / "docs" / "configuration.md"
    if os.environ.get("PREFORK_REGEN_DOCS"):
        path.write_text(text, encoding="utf-8")
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    assert current == text, f"docs/configuration.md is stale: run `{REGENERATE}` (or PREFORK_REGEN_DOCS=1 pytest)"


def test_config_fields_are_documented() -> None:
    for cls in (Config, PoolConfig, StrategySpec):
        assert all(f.metadata.get("doc") for f in attrs.fields(cls)), cls
