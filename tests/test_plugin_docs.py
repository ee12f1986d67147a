"""docs/plugins.md, run: every snippet and config on the page, the five example
plugins (one per kind of strategy) loaded as plugins and used by real pools, the
contract suite of each kind against each, and what the page says about a plugin
that arrives twice and about the errors a plugin author meets.

The page marks its code blocks for this module with an HTML comment on the line
before the block (invisible on the rendered page):

``<!-- file: NAME.py -->``
    a module the reader saves; written to a directory on ``sys.path``.
``<!-- run -->``
    run as it is, in a fresh namespace, with those modules importable.
``<!-- pytest -->``
    a plugin's own test module; run here, collected from this module.
``<!-- config -->``
    a ``prefork.toml``, loaded with ``load_config``.

The example files are shown whole (``tests/test_plugin_examples.py`` checks that).
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import sys
import syslog
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest

import prefork
from prefork import Executor, MethodNotFound, load_config
from prefork._supervisor import Supervisor
from prefork.errors import PluginError
from prefork.plugins import build_plugin_manager, build_registry
from prefork.strategies.registry import REQUIRED
from prefork.testing import wait_for_file, wait_until

# `plugins = ["examples.plugin_..."]` imports from the project root, as the page says to run from there.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import (  # noqa: E402
    plugin_backlog_policy,
    plugin_math_resolver,
    plugin_tickets_sink,
    plugin_zlib_transport,
    plugin_zpickle_serializer,
)
from examples.plugin_backlog_policy import InHandPolicy  # noqa: E402
from examples.plugin_tickets_sink import Expired, TicketSink  # noqa: E402
from examples.plugin_zpickle_serializer import ZpickleSerializer  # noqa: E402

DOC = ROOT / "docs" / "plugins.md"
EXAMPLES = (
    plugin_backlog_policy,
    plugin_zlib_transport,
    plugin_zpickle_serializer,
    plugin_math_resolver,
    plugin_tickets_sink,
)
WAIT = 30.0  # seconds for any one outcome; generous for a loaded machine


# -- the page's code blocks ----------------------------------------------------------------


class Block(NamedTuple):
    line: int  #: where the block's fence is, 1-based
    mark: str  #: the HTML comment on the line before it, or ""
    lang: str
    code: str


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        lang = fence.group(1)
        mark = re.match(r"^\s*<!-- (.*?) -->\s*$", lines[i - 1]) if i else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        found.append(Block(i + 1, mark.group(1) if mark else "", lang, code))
        i = end + 1
    return found


BLOCKS = blocks(DOC.read_text(encoding="utf-8"))
FILES = {b.mark.removeprefix("file: "): b.code for b in BLOCKS if b.mark.startswith("file: ")}
RUN = [b for b in BLOCKS if b.mark == "run"]
CONFIGS = [b for b in BLOCKS if b.mark == "config"]
(PYTEST,) = [b for b in BLOCKS if b.mark == "pytest"]


def test_every_python_block_on_the_page_is_run_or_is_an_example_file() -> None:
    shown_whole = {Path(m.__file__).read_text(encoding="utf-8") for m in EXAMPLES}  # type: ignore[arg-type]
    for block in BLOCKS:
        if block.lang == "python":
            assert block.mark in ("run", "pytest") or block.mark.startswith("file: ") or block.code in shown_whole, (
                f"docs/plugins.md:{block.line}: a python block that no test runs; mark it (see {__name__})"
            )
    assert len(RUN) >= 10 and len(CONFIGS) >= 6 and set(FILES) == {"my_plugin.py", "my_hooks.py"}


@pytest.fixture
def page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, str]]]:
    """The page's modules importable, syslog and the temporary directory kept to the test.
    Yields what the snippets sent to syslog."""
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)
    modules = tmp_path / "modules"
    modules.mkdir()
    for name, code in FILES.items():
        (modules / name).write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(modules))
    sent: list[tuple[int, str]] = []
    monkeypatch.setattr(syslog, "syslog", lambda priority, message: sent.append((priority, message)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield sent
    for name in FILES:
        module = sys.modules.pop(name.removesuffix(".py"), None)
        db = getattr(module, "db", None)
        if isinstance(db, sqlite3.Connection):
            db.close()


@pytest.mark.parametrize("block", RUN, ids=lambda b: f"line {b.line}")
def test_snippet_runs(page: list[tuple[int, str]], block: Block) -> None:
    code = compile(block.code, f"docs/plugins.md:{block.line}", "exec")
    exec(code, {"__name__": "__doc_snippet__"})
    if "my_hooks" in block.code:  # section 9: the hooks did what the page says
        assert page == [(syslog.LOG_WARNING, "prefork: hello from my_hooks")]
        assert sys.modules["my_hooks"].db is not None


@pytest.mark.parametrize("block", CONFIGS, ids=lambda b: f"line {b.line}")
def test_config_loads(page: Any, block: Block, tmp_path: Path) -> None:
    assert block.lang == "toml"
    path = tmp_path / "prefork.toml"
    path.write_text(block.code, encoding="utf-8")
    config = load_config(path)
    for kind in prefork.strategies.KINDS:
        if f"[{kind}]" in block.code:
            assert re.search(rf'^name = "{config.spec(kind).name}"$', block.code, re.M)


# Section 12's test module, as a plugin author would write it: collected from here.
exec(compile(PYTEST.code, f"docs/plugins.md:{PYTEST.line}", "exec"), globals())


# -- scaling: backlog -------------------------------------------------------------------------


def test_backlog_grows_with_the_work_and_shrinks_when_idle(tmp_path: Path) -> None:
    config = load_config(
        None,
        {
            "plugins": ["examples.plugin_backlog_policy"],
            "scaling.name": "in-hand",
            "scaling.floor": 1,
            "scaling.ceiling": 3,
            "scaling.per_worker": 1,
            "scaling.idle_timeout": 0.2,
        },
    )
    assert isinstance(config.create("scaling"), InHandPolicy)
    gate = tmp_path / "gate"
    with Executor(config=config) as pool:
        wait_until(lambda: len(pool.pids()) == 1, WAIT, what="the floor's one worker")
        held = [pool.submit(wait_for_file, str(gate), WAIT) for _ in range(3)]
        wait_until(lambda: len(pool.pids()) == 3 and pool.stats()["busy"] == 3, WAIT, what="three busy workers")
        assert pool.stats()["spawned_total"] == 3  # never past the ceiling
        gate.touch()
        assert len({f.result(WAIT) for f in held}) == 3  # one task per worker, at once
        wait_until(lambda: len(pool.pids()) == 1, WAIT, what="the surplus workers to retire")
        assert pool.stats()["spawned_total"] == 3


def test_backlog_options_are_checked_with_their_location() -> None:
    with pytest.raises(prefork.ConfigError, match=r"^keyword arguments: scaling.floor = 5: must be <= ceiling \(2\)$"):
        load_config(
            None,
            {
                "plugins": ["examples.plugin_backlog_policy"],
                "scaling.name": "in-hand",
                "scaling.floor": 5,
                "scaling.ceiling": 2,
            },
        )


# -- transport: zlib --------------------------------------------------------------------------


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def test_zlib_carries_calls_and_results_both_ways_in_a_pool() -> None:
    config = load_config(
        None,
        {
            "plugins": ["examples.plugin_zlib_transport"],
            "transport.name": "zlib",
            "transport.min_size": 64,
            "scaling.workers": 2,
        },
    )
    with Executor(config=config) as pool:
        assert list(pool.map(math.sqrt, range(300))) == [math.sqrt(i) for i in range(300)]  # batched frames
        assert pool.submit(len, b"z" * 5_000_000).result(WAIT) == 5_000_000  # compresses
        noise = pool.submit(random_bytes, 3_000_000).result(WAIT)  # does not: goes raw
        assert len(noise) == 3_000_000
        assert pool.submit(bytes.hex, noise[:100]).result(WAIT) == noise[:100].hex()


# -- serializer: zpickle ------------------------------------------------------------------------


def test_zpickle_in_a_pool_keeps_types_and_reports_what_it_cannot_carry() -> None:
    config = load_config(
        None,
        {
            "plugins": ["examples.plugin_zpickle_serializer"],
            "serializer.name": "zpickle",
            "serializer.level": 1,
            "scaling.workers": 2,
        },
    )
    with Executor(config=config) as pool:
        records = [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(20_000)]
        assert pool.submit(len, records).result(WAIT) == 20_000
        assert pool.submit(sorted, records[:3], key=repr).result(WAIT) == sorted(records[:3], key=repr)
        assert pool.submit(bytes, 2_000_000).result(WAIT) == bytes(2_000_000)
        with pytest.raises(ZeroDivisionError):
            pool.submit(divmod, 1, 0).result(WAIT)
        lock = threading.Lock()
        failed = pool.submit(len, [lock])  # pickle refuses a lock: the task fails, the pool lives
        with pytest.raises(TypeError, match="lock"):
            failed.result(0)  # settled before submit returned
        error = failed.exception()
        assert error is not None and "serialized with 'zpickle' (at args[0][0])" in error.__notes__[0]
        assert pool.submit(abs, -3).result(WAIT) == 3


def test_zpickle_loads_keeps_nothing_of_the_buffer_it_was_given() -> None:
    ser = ZpickleSerializer(min_size=0)
    for value in (b"x" * 100, b"y" * 100_000, os.urandom(100_000), ["text"] * 1000):
        buf = bytearray(ser.dumps(value))  # as a channel's reused receive buffer
        got = ser.loads(memoryview(buf))
        buf[:] = bytes(len(buf))  # the next frame lands in the same buffer
        assert got == value


# -- resolver: math -----------------------------------------------------------------------------


def test_math_resolver_resolves_names_in_the_workers() -> None:
    config = load_config(
        None,
        {
            "plugins": ["examples.plugin_math_resolver"],
            "resolver.name": "math",
            "resolver.module": "cmath",
            "resolver.prefix": "c.",
            "scaling.workers": 2,
        },
    )
    with Executor(config=config) as pool:
        assert pool.submit("c.sqrt", -4).result(WAIT) == 2j
        assert list(pool.map("c.exp", [0, 0])) == [1, 1]
        assert pool.submit(os.getpid).result(WAIT) in pool.pids()  # a callable is not resolved
        for name in ("c.pi", "c._x", "math.sqrt", "sqrt"):
            with pytest.raises(MethodNotFound, match=re.escape(f"no method named {name!r}")):
                pool.submit(name, 1).result(WAIT)


# -- sink: tickets ------------------------------------------------------------------------------


@pytest.fixture
def tickets_pool() -> Iterator[Supervisor]:
    config = load_config(
        None,
        {
            "plugins": ["examples.plugin_tickets_sink"],
            "sink.name": "tickets",
            "sink.max_wait": 0.5,
            "scaling.workers": 1,
            "pool.prefetch": 1,  # one task per worker: the next one waits in the queue
        },
    )
    pool = Supervisor(config)
    pool.start()
    yield pool
    pool.shutdown()


def test_tickets_drop_tasks_that_queued_too_long(tickets_pool: Supervisor, tmp_path: Path) -> None:
    pool, sink = tickets_pool, tickets_pool.sink
    assert isinstance(sink, TicketSink)  # made from the config: [sink] name = "tickets"
    assert sink.result(pool.submit(math.factorial, (10,)), WAIT) == 3628800
    gate = tmp_path / "gate"
    held = pool.submit(wait_for_file, (str(gate), WAIT))
    wait_until(lambda: pool.stats()["in_flight"] == 1 and pool.stats()["queued"] == 0, WAIT, what="the task claimed")
    late = [pool.submit(math.sqrt, (x,)) for x in (4.0, 9.0)]
    time.sleep(0.7)  # longer than max_wait
    gate.touch()
    assert sink.result(held, WAIT) in pool.pids()
    for ticket in late:
        with pytest.raises(Expired, match=rf"^task {ticket} waited .* more than sink.max_wait = 0.5$"):
            sink.result(ticket, WAIT)
    assert sink.result(pool.submit(math.sqrt, (16.0,)), WAIT) == 4.0
    with pytest.raises(ValueError, match="math domain error"):
        sink.result(pool.submit(math.sqrt, (-1.0,)), WAIT)
    with pytest.raises(TimeoutError, match="has no outcome"):
        sink.result(10**6, 0.01)


def test_tickets_are_delivered_from_the_submitting_and_the_shutting_down_thread(
    tickets_pool: Supervisor, tmp_path: Path
) -> None:
    pool, sink = tickets_pool, tickets_pool.sink
    assert isinstance(sink, TicketSink)
    bad = pool.submit(len, (threading.Lock(),))  # cannot be serialized: delivered before submit returned
    with pytest.raises(TypeError, match="lock"):
        sink.result(bad, 0)
    gate = tmp_path / "gate"
    held = pool.submit(wait_for_file, (str(gate), WAIT))
    wait_until(lambda: pool.stats()["in_flight"] == 1, WAIT, what="the task claimed")
    queued = [pool.submit(abs, (-i,)) for i in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)  # the queued tasks are delivered here, cancelled
    for ticket in queued:
        with pytest.raises(CancelledError):
            sink.result(ticket, 0)
    gate.touch()
    assert sink.result(held, WAIT) > 0  # a graceful shut-down lets the running task finish
    assert pool.join(WAIT)


# -- registration: what is checked -------------------------------------------------------------


class ZPickle:
    """A serializer that forgot its ``objects`` flag."""

    name = "zpickle"

    def dumps(self, obj: Any) -> bytes:
        return b""

    def loads(self, data: bytes) -> Any:
        return None


def test_a_class_lacking_a_member_is_refused_with_the_message_the_page_shows() -> None:
    plugin = ModuleType("my_plugin")
    plugin.prefork_register_strategies = prefork.hookimpl(  # type: ignore[attr-defined]
        lambda registry: registry.register("serializer", ZPickle)
    )
    with pytest.raises(PluginError) as info:
        build_registry(build_plugin_manager(plugins=[plugin], autoload=False))
    message = f"prefork.errors.PluginError: {info.value}"
    assert "lacks `objects`: a serializer strategy needs `objects`, `dumps`, `loads`" in message
    doc = DOC.read_text(encoding="utf-8")
    assert f"```text\n{message}\n```" in doc
    for kind, members in REQUIRED.items():  # the page's table is the registry's
        assert f"| `{kind}` | {', '.join(f'`{m}`' for m in members)} |" in doc


# -- a plugin that arrives twice (section 8), with a real entry point ---------------------------


def install(where: Path, dist: str, entry_points: dict[str, str]) -> None:
    """A distribution declaring ``entry_points`` in the ``prefork`` group, found on ``where``."""
    info = where / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[prefork]\n{lines}", encoding="utf-8")


ZPICKLE = "examples.plugin_zpickle_serializer"


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The zpickle example installed as a distribution whose entry point is named 'zp';
    autoload on, as it is outside the test suite."""
    install(tmp_path / "site", "demo-zpickle", {"zp": ZPICKLE})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("PREFORK_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)
    return plugin_zpickle_serializer


def registrations(pm: Any, module: ModuleType) -> list[str]:
    return [name for name, plugin in pm.list_name_plugin() if plugin is module]


def test_an_installed_plugin_listed_in_plugins_too_is_registered_once_under_its_entry_point(
    installed: ModuleType,
) -> None:
    config = load_config(None, {"plugins": [ZPICKLE, ZPICKLE], "serializer.name": "zpickle"})  # no error
    assert registrations(config.plugin_manager, installed) == ["zp"]
    (entry,) = [r for r in config.registry if r.name == "zpickle"]
    assert entry.plugin == "zp"
    with Executor(config=config) as pool:
        assert pool.submit(len, "z" * 10_000).result(WAIT) == 10_000


def test_without_autoload_the_list_loads_it_under_its_module_name(
    installed: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFORK_DISABLE_PLUGIN_AUTOLOAD", "1")
    config = load_config(None, {"plugins": [ZPICKLE], "serializer.name": "zpickle"})
    assert registrations(config.plugin_manager, installed) == [ZPICKLE]
    assert registrations(build_plugin_manager(autoload=True), installed) == ["zp"]  # the argument wins
    assert registrations(build_plugin_manager(plugins=[ZPICKLE], autoload=False), installed) == [ZPICKLE]


def test_blocking_one_name_of_a_plugin_that_has_two_lets_the_other_load_it(
    installed: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFORK_DISABLE_PLUGINS", "zp")
    assert registrations(build_plugin_manager(plugins=[ZPICKLE]), installed) == [ZPICKLE]
    assert registrations(build_plugin_manager(), installed) == []
    monkeypatch.setenv("PREFORK_DISABLE_PLUGINS", ZPICKLE)
    assert registrations(build_plugin_manager(plugins=[ZPICKLE]), installed) == ["zp"]
    monkeypatch.setenv("PREFORK_DISABLE_PLUGINS", f"zp,{ZPICKLE}")
    assert registrations(build_plugin_manager(plugins=[ZPICKLE]), installed) == []


def test_the_same_holds_for_the_installed_msgpack_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    prefork_msgpack = pytest.importorskip("prefork_msgpack", reason="pip install ./plugins/prefork-msgpack")
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)
    pm = build_plugin_manager(plugins=["prefork_msgpack"], autoload=True)
    assert registrations(pm, prefork_msgpack) == ["msgpack"]
    assert registrations(build_plugin_manager(plugins=["prefork_msgpack"], autoload=False), prefork_msgpack) == [
        "prefork_msgpack"
    ]


# -- section 11: the messages are real -----------------------------------------------------------

BROKEN_PLUGINS = {
    "kind_plugin": 'from prefork import hookimpl\nclass Mine:\n    name = "mine"\n'
    '@hookimpl\ndef prefork_register_strategies(registry):\n    registry.register("serialiser", Mine)\n',
    "noname_plugin": "from prefork import hookimpl\nclass Mine:\n    objects = True\n    dumps = loads = print\n"
    '@hookimpl\ndef prefork_register_strategies(registry):\n    registry.register("serializer", Mine)\n',
    "typo_plugin": "from prefork import hookimpl\n@hookimpl\ndef prefork_worker_inti(worker):\n    pass\n",
    "arg_plugin": "from prefork import hookimpl\n@hookimpl\ndef prefork_worker_init(worker, pool):\n    pass\n",
    "boom_plugin": "from prefork import hookimpl\n@hookimpl\ndef prefork_register_strategies(registry):\n"
    '    raise RuntimeError("no licence key")\n',
    "broken_import": "import not_installed_dependency  # noqa\n",
    "my_plugin": 'from prefork import hookimpl\nclass MyJson:\n    name = "json"\n    objects = False\n'
    "    dumps = loads = print\n"
    '@hookimpl\ndef prefork_register_strategies(registry):\n    registry.register("serializer", MyJson)\n',
}


def test_the_error_messages_on_the_page_are_the_real_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = tmp_path / "app"
    app.mkdir()
    for name, code in BROKEN_PLUGINS.items():
        (app / f"{name}.py").write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(app))
    monkeypatch.delenv("PREFORK_DISABLE_PLUGINS", raising=False)
    doc = DOC.read_text(encoding="utf-8")
    try:
        for name in BROKEN_PLUGINS:
            with pytest.raises(PluginError) as info:
                build_registry(build_plugin_manager(plugins=[name], autoload=False))
            message = f"prefork.errors.PluginError: {info.value}".replace(str(app), "/home/me/app")
            assert f"```text\n{message}\n```" in doc, f"{name}: the page does not show\n{message}"
        install(tmp_path / "site", "broken-plugin", {"broken": "broken_plugin_module"})
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        with pytest.raises(PluginError) as info:
            build_plugin_manager(autoload=True)
        assert f"```text\nprefork.errors.PluginError: {info.value}\n```" in doc
    finally:
        for name in BROKEN_PLUGINS:
            sys.modules.pop(name, None)


def test_a_plugin_problem_in_a_config_is_a_config_error_naming_the_plugins_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "boom_plugin.py").write_text(BROKEN_PLUGINS["boom_plugin"], encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "prefork.toml"
    path.write_text('plugins = ["boom_plugin"]\n', encoding="utf-8")
    try:
        with pytest.raises(prefork.ConfigError, match=rf"^{re.escape(str(path))}: plugin 'boom_plugin' failed"):
            load_config(path)
    finally:
        sys.modules.pop("boom_plugin", None)
