"""docs/operations.md, its promises checked: the config block, the links, the
commands it names, which pools listen and under which name, and how far a pool grows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import attrs
import pytest

import prefork
from prefork._operate import DERIVED
from prefork._supervisor import WORKER_LIMIT, Supervisor
from prefork.cli import build_parser
from prefork.config import load_config
from prefork.control import NameTaken, list_pools

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "operations.md").read_text()


def blocks(mark: str) -> list[str]:
    return re.findall(rf"<!-- operations: {mark} -->\n```\w*\n(.*?)```", PAGE, re.S)


def test_the_config_block_loads_as_it_says(tmp_path: Path) -> None:
    [toml] = blocks("config")
    path = tmp_path / "prefork.toml"
    path.write_text(toml)
    config = load_config(path)
    assert config.name == "shop-jobs"
    assert (config.control.enabled, config.control.metrics_port, config.control.http) == (True, 9464, "127.0.0.1:9101")
    assert config.control.metrics_addr == "127.0.0.1"


def test_every_link_on_the_page_leads_to_a_page() -> None:
    for target in re.findall(r"\]\(([^)#]+)", PAGE):
        assert (ROOT / "docs" / target).is_file(), target


def test_every_command_the_page_names_is_one_the_cli_takes() -> None:
    parser = build_parser()
    commands = set(re.findall(r"`(prefork (?:status|ctl|run|simulate)[^`|]*)`", PAGE))
    assert len(commands) >= 6
    for command in commands:
        argv = shlex.split(command.replace("NAME", "web").replace(" N", " 2").replace("[--graceful]", "--graceful"))[1:]
        parser.parse_args(argv)  # argparse exits (SystemExit) on anything it does not take


@pytest.fixture
def sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime / "prefork"


def names(directory: Path) -> set[str]:
    return {p.name for p in list_pools(directory)}


@pytest.mark.parametrize("facade", ["executor", "bossworker", "dispatcher"])
def test_a_pool_made_in_code_listens_when_asked_with_control_true(facade: str, sockets: Path) -> None:
    if facade == "executor":
        pool: Any = prefork.Executor(1, control=True, overrides={"name": "coded"})
        stop = pool.shutdown
    elif facade == "bossworker":
        pool = prefork.BossWorker(abs, worker_count=1, control=True, overrides={"name": "coded"})
        stop = pool.shut_down
    else:
        pool = prefork.Dispatcher(methods={"abs": abs}, max_forks=1, control=True, fork_name="coded")
        stop = pool.shutdown
    try:
        assert "coded" in names(sockets)
        assert pool.status()["name"] == "coded"
    finally:
        stop()
    assert not (sockets / "coded.sock").exists()


def test_the_mpm_listens_when_asked(sockets: Path) -> None:
    from prefork.mpm import MPM

    m = MPM(start_servers=1, min_spare_servers=0, max_spare_servers=1, max_servers=1, control=True,
            overrides={"name": "kids"})
    try:
        m.whip_kids(_idle_briefly, (), timeout=0.05)
        assert "kids" in names(sockets)
    finally:
        m.done()
    assert not (sockets / "kids.sock").exists()


def _idle_briefly() -> None:
    import time

    time.sleep(0.05)


def test_a_name_nobody_chose_gives_way_and_a_chosen_one_does_not(sockets: Path) -> None:
    first = Supervisor(load_config(None, {"name": "jobs", "control.enabled": True, "scaling.workers": 1}))
    first.start()
    try:
        chosen = Supervisor(load_config(None, {"name": "jobs", "control.enabled": True, "scaling.workers": 1}))
        with pytest.raises(NameTaken, match="pool name 'jobs' is taken"):
            chosen.start()
        config = load_config(None, {"control.enabled": True, "scaling.workers": 1})
        derived = attrs.evolve(config, name="jobs", sources={**config.sources, "name": DERIVED})
        second = Supervisor(derived)
        second.start()
        try:
            assert second.endpoints.name.startswith("jobs-") and {"jobs", second.endpoints.name} <= names(sockets)
        finally:
            second.shutdown()
    finally:
        first.shutdown()
    assert names(sockets) == set()


def test_a_pool_grows_at_run_time_to_its_limit_and_no_further() -> None:
    sup = Supervisor(load_config(None, {"scaling.name": "fixed", "scaling.workers": 1}))
    try:
        assert sup.worker_limit == WORKER_LIMIT == 64
        assert sup.resize(1000).workers == 64  # type: ignore[attr-defined]
    finally:
        sup.shutdown()


def test_the_readme_shows_the_tested_status_sample_and_commands_the_cli_takes() -> None:
    readme = (ROOT / "README.md").read_text()
    control = (ROOT / "docs" / "control.md").read_text()
    sample = re.search(r"```console\n(\$ prefork status web\n.*?)```", control, re.S)
    assert sample is not None and sample.group(1) in readme  # the sample docs/control.md's test renders
    parser = build_parser()
    block = readme[readme.index("## The command"):]
    block = block[block.index("```sh\n") + 6:block.index("```", block.index("```sh\n") + 6)]
    for line in block.splitlines():
        command = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).strip()  # optional parts dropped
        for choice in re.split(r" \| ", command):
            argv = shlex.split(choice.replace("NAME", "web"))
            argv = argv[1:] if argv[0] == "prefork" else ["ctl", "web", *argv]
            if argv[0] in ("status", "ctl", "check", "plugins", "simulate", "run", "serve"):
                parser.parse_args(argv)
