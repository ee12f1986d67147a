"""Import paths are found beside the config file (docs/configuration.md), and ``prefork check``
imports every one of them: run as a user runs them, from another directory, in a subprocess,
and in process where only ``sys.path`` itself can show it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefork.config import load_config
from prefork.config._imports import add_config_directory, import_paths
from prefork.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def prefork(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def own_sys_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """``load_config`` puts the config's directory on ``sys.path``: keep that, and the modules
    the test imports from there, to the test."""
    path = list(sys.path)
    monkeypatch.setattr(sys, "path", path)
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:
        if name.startswith("beside_"):
            del sys.modules[name]


# -- prefork run from another directory (subprocesses) -------------------------------------------


def test_run_from_another_directory_finds_the_app_and_a_workers_import_beside_the_config(tmp_path: Path) -> None:
    """The app is imported from the config's directory; so is a task named by import path,
    which only a worker imports (the worker inherits the directory on ``sys.path``)."""
    write(tmp_path / "deploy" / "prefork.toml", """\
        app = "deployapp:main"
        [scaling]
        name = "fixed"
        workers = 1
        [control]
        enabled = false
    """)
    write(tmp_path / "deploy" / "deployapp.py", """\
        import sys

        def main(pool):
            assert "deployhelper" not in sys.modules  # imported by the worker alone
            print("square:", pool.submit("deployhelper:square", 7).result())
    """)
    write(tmp_path / "deploy" / "deployhelper.py", "def square(x):\n    return x * x\n")
    (tmp_path / "elsewhere").mkdir()
    out = prefork("run", "-c", "../deploy/prefork.toml", cwd=tmp_path / "elsewhere")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "square: 49"


def test_the_configs_directory_comes_before_the_current_one_which_is_still_searched(tmp_path: Path) -> None:
    write(tmp_path / "deploy" / "prefork.toml", 'app = "samename:main"\n[control]\nenabled = false\n')
    write(tmp_path / "deploy" / "samename.py", """\
        import cwdonly

        def main(pool):
            print("beside the config;", cwdonly.WHERE)
    """)
    write(tmp_path / "cwd" / "samename.py", 'def main(pool):\n    print("in the current directory")\n')
    write(tmp_path / "cwd" / "cwdonly.py", 'WHERE = "cwdonly from the current directory"\n')
    out = prefork("run", "-c", str(tmp_path / "deploy" / "prefork.toml"), cwd=tmp_path / "cwd")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "beside the config; cwdonly from the current directory"


def test_a_symlinked_config_finds_the_modules_beside_the_file_it_points_to(tmp_path: Path) -> None:
    write(tmp_path / "release" / "prefork.toml", 'app = "linkedapp:main"\n[control]\nenabled = false\n')
    write(tmp_path / "release" / "linkedapp.py", 'def main(pool):\n    print("linked app")\n')
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "prefork.toml").symlink_to(tmp_path / "release" / "prefork.toml")
    out = prefork("run", "-c", "etc/prefork.toml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "linked app"


def _doc_block(doc: str, heading: str) -> str:
    """The first fenced block after ``heading`` in a doc."""
    text = (ROOT / doc).read_text()
    found = re.search(rf"^{re.escape(heading)}\n.*?```\w*\n(.*?)```", text, re.S | re.M)
    assert found, f"{doc}: no code block under {heading!r}"
    return found.group(1)


DISPATCHER_APP = '''\
import time

def add(sender, a, b):
    return a + b

class Handlers:
    def mul(sender, a, b):
        return a * b

def on_result(request, response):
    print(request["method_name"], "->", response, flush=True)

def main(dispatcher):
    dispatcher.new_request({"method_name": "add", "params": [2, 3]})
    dispatcher.new_request({"method_name": "mul", "params": [4, 5]})
'''


def test_the_dispatcher_docs_from_a_file_example_runs_from_another_directory(tmp_path: Path) -> None:
    """docs/profiles/dispatcher.md "From a file": its TOML, with a ``myapp.py`` beside it."""
    (tmp_path / "calc").mkdir()
    (tmp_path / "calc" / "prefork.toml").write_text(_doc_block("docs/profiles/dispatcher.md", "## From a file"))
    (tmp_path / "calc" / "myapp.py").write_text(DISPATCHER_APP)
    (tmp_path / "elsewhere").mkdir()
    check = prefork("check", "-c", "../calc/prefork.toml", cwd=tmp_path / "elsewhere")
    assert check.returncode == 0, check.stderr
    assert "OK: profile 'dispatcher'" in check.stderr
    out = prefork("run", "-c", "../calc/prefork.toml", "--set", "control.enabled=false", cwd=tmp_path / "elsewhere")
    assert out.returncode == 0, out.stderr
    assert "add -> 5" in out.stdout and "mul -> 20" in out.stdout, out.stdout


# -- in process: sys.path, plugins and strategies beside the config -------------------------------


def test_a_plugin_a_strategy_and_its_options_are_imported_from_beside_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_sys_path: list[str]
) -> None:
    conf = tmp_path / "conf"
    write(conf / "beside_plugin.py", """\
        from prefork import hookimpl

        @hookimpl
        def prefork_register_strategies(registry):
            pass
    """)
    write(conf / "beside_policy.py", """\
        import attrs
        from prefork.strategies.scaling import FixedPolicy

        @attrs.define
        class Three(FixedPolicy):
            workers: int = 3
    """)
    write(conf / "beside_ops.py", "def add(a, b):\n    return a + b\n")
    write(conf / "prefork.toml", """\
        plugins = ["beside_plugin"]
        [scaling]
        name = "beside_policy:Three"
        [resolver]
        name = "methods"
        methods = { add = "beside_ops:add" }
    """)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config("../conf/prefork.toml")
    assert own_sys_path[0] == str(conf)
    plugin = config.plugin_manager.get_plugin("beside_plugin")
    assert plugin is not None and plugin.__file__ == str(conf / "beside_plugin.py")
    assert type(config.create("scaling")).__module__ == "beside_policy" and config.create("scaling").workers == 3
    assert config.create("resolver").resolve("add")(2, 3) == 5


def test_the_directory_is_added_once_and_left_where_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_sys_path: list[str]
) -> None:
    (tmp_path / "prefork.toml").write_text("")
    load_config(tmp_path / "prefork.toml")
    load_config(tmp_path / "prefork.toml")
    assert own_sys_path.count(str(tmp_path)) == 1 and own_sys_path[0] == str(tmp_path)
    elsewhere = tmp_path / "later"
    elsewhere.mkdir()
    (elsewhere / "prefork.toml").write_text("")
    own_sys_path.append(str(elsewhere))  # on sys.path already, at the end: it stays there
    monkeypatch.chdir(elsewhere)
    assert add_config_directory("prefork.toml") == str(elsewhere)
    assert own_sys_path[-1] == str(elsewhere) and own_sys_path.count(str(elsewhere)) == 1
    assert own_sys_path[0] == str(tmp_path)


def test_import_paths_lists_every_import_path_and_who_imports_it() -> None:
    """Every callable setting, the signal handlers and the resolvers' options; those only
    workers import are marked (``prefork run`` and ``serve`` leave them to the workers)."""
    config = load_config(None, {
        "profile": "mpm", "app": "a:app", "pool.initializer": "b:init", "pool.finalizer": "c:fin",
        "boss_worker.work_handler": "d:work", "boss_worker.result_handler": "e:res", "dispatcher.talkback": "f:talk",
        "mpm.child_data_hook": "g:hook", "mpm.wsgi": "h:wsgi", "mpm.child_sigh": {"HUP": "i:hup", "USR1": "IGNORE"},
        "resolver": {"name": "chain", "methods": {"add": "j:add", "sub": len}, "classes": ["k", "l:Handlers", str]},
    })
    assert [tuple(path) for path in import_paths(config)] == [
        ("app", "a:app", True, False), ("pool.initializer", "b:init", True, False),
        ("pool.finalizer", "c:fin", True, False), ("boss_worker.work_handler", "d:work", True, True),
        ("boss_worker.result_handler", "e:res", True, False), ("dispatcher.talkback", "f:talk", True, False),
        ("mpm.child_data_hook", "g:hook", True, False), ("mpm.wsgi", "h:wsgi", True, False),
        ("mpm.child_sigh.HUP", "i:hup", True, False), ("resolver.methods.add", "j:add", True, True),
        ("resolver.classes[0]", "k", False, True), ("resolver.classes[1]", "l:Handlers", False, True),
    ]


# -- prefork check imports every import path ------------------------------------------------------


CHECK_CASES = {
    "missing module": ('app = "nosuchmod:main"\n',
                       "prefork.toml: app = 'nosuchmod:main': cannot import it: No module named 'nosuchmod'"),
    "an int": ('app = "values:number"\n', "prefork.toml: app = 'values:number': int is not callable"),
    "missing attribute": ('app = "values:nothing"\n',
                          "prefork.toml: app = 'values:nothing': cannot import it: module 'values' has no attribute 'nothing'"),
    "wsgi not callable": ('profile = "mpm"\n[mpm]\nwsgi = "values:text"\n',
                          "prefork.toml: mpm.wsgi = 'values:text': str is not callable"),
    "syntax error": ('[pool]\ninitializer = "broken:init"\n',
                     "prefork.toml: pool.initializer = 'broken:init': cannot import it: SyntaxError: "),
    "raises on import": ('[boss_worker]\nwork_handler = "raising:work"\n',
                         "prefork.toml: boss_worker.work_handler = 'raising:work': importing it raised RuntimeError: "
                         "no database"),
    "its own import is missing": ('app = "needsdep:main"\n', "prefork.toml: app = 'needsdep:main': importing it raised "
                                  "ModuleNotFoundError: No module named 'nosuchdependency'"),
    "a signal handler": ('profile = "mpm"\n[mpm.child_sigh]\nHUP = "DEFALT"\n',
                         "prefork.toml: mpm.child_sigh.HUP = 'DEFALT': cannot import it: 'DEFALT' is not of the form"),
    "missing plugin": ('plugins = ["nosuchplugin"]\n', "prefork.toml: plugins = [...]: cannot import plugin module "
                       "'nosuchplugin': No module named 'nosuchplugin'"),
    "a plugin that fails": ('plugins = ["broken"]\n', "prefork.toml: plugins = [...]: cannot import plugin module "
                            "'broken': SyntaxError: expected ':' ("),
    "a resolver's method": ('[resolver]\nname = "methods"\nmethods = { add = "values:add" }\n',
                            "prefork.toml: resolver.methods.add = 'values:add': cannot import it: module 'values' has "
                            "no attribute 'add'"),
    "a resolver's class": ('[resolver]\nname = "chain"\nclasses = ["values", "nosuchmod:Handlers"]\n',
                           "prefork.toml: resolver.classes[1] = 'nosuchmod:Handlers': cannot import it: No module "
                           "named 'nosuchmod'"),
    "a worker's handler": ('profile = "boss-worker"\n[boss_worker]\nwork_handler = "values:number"\n',
                           "prefork.toml: boss_worker.work_handler = 'values:number': int is not callable"),
}


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conf = tmp_path_factory.mktemp("check")
    (conf / "values.py").write_text('number = 3\ntext = "app"\n')
    (conf / "broken.py").write_text("def init()\n    pass\n")
    (conf / "raising.py").write_text('raise RuntimeError("no database")\n')
    (conf / "needsdep.py").write_text("import nosuchdependency\n")
    (conf / "elsewhere").mkdir()
    return conf


@pytest.mark.parametrize("case", CHECK_CASES)
def test_check_imports_each_import_path_and_names_the_key_and_file(modules: Path, case: str) -> None:
    toml, expected = CHECK_CASES[case]
    (modules / "prefork.toml").write_text(toml)
    out = prefork("check", "-c", "../prefork.toml", cwd=modules / "elsewhere")
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prefork: error: ../{expected}"), out.stderr


def test_check_reports_every_bad_import_path_one_line_each(modules: Path) -> None:
    (modules / "prefork.toml").write_text('app = "values:number"\n[pool]\ninitializer = "nosuchmod:init"\n'
                                          'finalizer = "values:fin"\n')
    out = prefork("check", "-c", str(modules / "prefork.toml"), cwd=modules / "elsewhere")
    assert out.returncode == 2
    where = modules / "prefork.toml"
    assert out.stderr.splitlines() == [
        f"prefork: error: {where}: app = 'values:number': int is not callable",
        f"prefork: error: {where}: pool.initializer = 'nosuchmod:init': cannot import it: No module named 'nosuchmod'",
        f"prefork: error: {where}: pool.finalizer = 'values:fin': cannot import it: module 'values' has no attribute 'fin'",
    ]


def test_check_does_not_call_what_it_imports(modules: Path) -> None:
    (modules / "calls.py").write_text("import os\n\ndef main(pool):\n    open(os.environ['CALLED'], 'w').close()\n")
    (modules / "prefork.toml").write_text('app = "calls:main"\n[pool]\ninitializer = "calls:main"\n')
    called = modules / "called"
    out = subprocess.run([sys.executable, "-m", "prefork", "check", "-c", "../prefork.toml"], cwd=modules / "elsewhere",
                         capture_output=True, text=True, timeout=60, env={**os.environ, "CALLED": str(called)})
    assert out.returncode == 0, out.stderr
    assert 'app = "calls:main"' in out.stdout and not called.exists()


def test_a_facade_names_the_key_of_a_child_data_hook_it_cannot_import(own_sys_path: list[str]) -> None:
    from prefork import MPM

    with pytest.raises(ConfigError, match=r"^keyword arguments: mpm.child_data_hook = 'nosuchmod:hook': cannot import "
                                          r"it: No module named 'nosuchmod'$"):
        MPM(child_data_hook="nosuchmod:hook")


@pytest.mark.parametrize(("key", "value", "says"), [
    ("initializer", "nosuchmod_for_init:setup", "cannot import it: No module named 'nosuchmod_for_init'"),
    ("finalizer", "os:sep", "str is not callable"),
])
def test_a_pool_from_code_names_a_bad_initializer_or_finalizer(tmp_path: Path, key: str, value: str,
                                                               says: str) -> None:
    """Library use (no CLI in between): the pool's own import of pool.initializer /
    pool.finalizer fails with a ConfigError naming the file, the key and the value."""
    cfg = tmp_path / "prefork.toml"
    cfg.write_text(f'[pool]\n{key} = "{value}"\n')
    from prefork import Executor

    with pytest.raises(ConfigError) as info:
        Executor(max_workers=1, config=cfg)
    assert str(info.value) == f"{cfg}: pool.{key} = {value!r}: {says}"
