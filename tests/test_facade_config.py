"""A facade honours every setting it accepts, or refuses it with one clear line.

``[sink]`` in a prefork.toml used to be silently ignored by BossWorker,
Dispatcher and Executor (``config.sink`` said one thing, the facade used
another); a dispatcher's ``xmlrpc_server_parent`` was dropped without a word
with a resolver other than ``chain``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prefork import BossWorker, Dispatcher, Executor
from prefork.errors import ConfigError


def echo(job: object) -> object:
    return job


def handler(sender: object, x: int) -> int:
    return x


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prefork.toml"
    path.write_text(text)
    return str(path)


def test_a_boss_worker_refuses_another_sink(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[sink]\nname = "callback"\n')
    with pytest.raises(ConfigError) as info:
        BossWorker(work_handler=echo, worker_count=1, config=path)
    text = str(info.value)
    assert text.startswith(f"{path}: sink.name = 'callback': a BossWorker") and "remove [sink]" in text
    assert "\n" not in text


def test_a_dispatcher_refuses_another_sink(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sink.name = 'queue': a Dispatcher"):
        Dispatcher(methods={"h": handler}, max_forks=1, config=_toml(tmp_path, '[sink]\nname = "queue"\n'))


def test_a_file_without_a_profile_gets_the_facades_profile(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[dispatcher]\nalias = "mine"\n')
    with Dispatcher(methods={"h": handler}, max_forks=1, config=path) as d:
        assert d._sup.config.profile == "dispatcher" and d._sup.config.scaling.name == "on-demand"


GOT: list[object] = []


def record(request: object, response: object) -> None:
    GOT.append(response)


def test_a_dispatcher_takes_its_callback_from_the_sink_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, f'[sink]\nname = "callback"\ncallback = "{__name__}:record"\n')
    with Dispatcher(methods={"h": handler}, max_forks=1, config=path) as d:
        d.new_request({"method_name": "h", "params": [7]})
    assert GOT == [7]


def test_xmlrpc_server_parent_without_a_chain_resolver_is_refused(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[dispatcher]\nxmlrpc_server_parent = "http://127.0.0.1:9/RPC2"\n[resolver]\nname = "methods"\n')
    with pytest.raises(ConfigError, match=r"xmlrpc_server_parent = 'http://127.0.0.1:9/RPC2': needs the 'chain' resolver"):
        Dispatcher(max_forks=1, config=path)


def test_an_executor_refuses_another_sink_and_takes_cancel_running_from_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sink.name = 'queue': an Executor"):
        Executor(1, config=_toml(tmp_path, '[sink]\nname = "queue"\n'))
    path = _toml(tmp_path, '[sink]\nname = "future"\ncancel_running = true\n[scaling]\nworkers = 1\n')
    with Executor(config=path) as ex:
        assert ex._sup.one_at_a_time  # cancel() of a running future kills its worker, as asked


def test_dispatchers_from_one_config_keep_their_hooks_to_themselves(tmp_path: Path) -> None:
    """Three Dispatchers built from one Config used to leave six plugins on the shared
    plugin manager, and each pool's special methods ran once per dispatcher made."""
    from prefork.config import load_config

    calls = tmp_path / "precalls"

    config = load_config(None, {"profile": "dispatcher", "scaling.pre_fork": 1, "scaling.max_forks": 1,
                                "resolver.methods": {"h": f"{__name__}:handler", "_precall": f"{__name__}:count_precall"},
                                "dispatcher.talkback": f"{__name__}:quiet"})
    before = config.plugin_manager.list_name_plugin()
    for _ in range(3):
        with Dispatcher.from_config(config) as d:
            d.new_request({"method_name": "h", "params": [1], "from": str(calls)})
    assert config.plugin_manager.list_name_plugin() == before
    assert calls.read_text() == "x" * 3  # once per request, not 1 + 2 + 3


def count_precall(sender: str, *params: object) -> None:
    with open(sender, "a") as f:
        f.write("x")


def quiet(line: str) -> None:
    pass


def test_special_methods_are_found_in_a_module_named_in_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare module name in ``classes`` worked for dispatching, but the special-method
    lookup imported it as 'module:attr', failed, and silently found no ``_precall``."""
    marker = tmp_path / "precalled"
    (tmp_path / "handlers_mod.py").write_text(
        "def _precall(sender, *params):\n"
        f"    open({str(marker)!r}, 'a').write('x')\n"
        "def neg(sender):\n"
        "    return -sender\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    got: list[object] = []
    with Dispatcher(classes=["handlers_mod"], max_forks=1) as d:
        d.new_request({"method_name": "neg", "params": [], "from": 5, "upon_result": lambda req, resp: got.append(resp)})
    assert got == [-5]
    assert marker.read_text() == "x", "_precall of a module named in classes did not run"
