"""Harakiri: ``[mpm] request_timeout`` kills a child busy longer than that, after its
Python stack is logged, and the pool replaces it; a child busy less long is left alone."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from prefork import mpm
from prefork.mpm import MPM
from prefork.testing import pid_alive


def stuck_in_a_request(flag: str) -> None:
    mpm.busy()
    with open(flag, "a") as f:
        f.write(f"{os.getpid()}\n")
    deep_in_the_app()


def deep_in_the_app() -> None:
    while True:
        time.sleep(0.05)


def _pids_written(flag: Path) -> list[int]:
    """The pids the children finished writing: the file exists as soon as a child opens it,
    before its line is in (a read in between saw it empty)."""
    text = flag.read_text() if flag.exists() else ""
    return [int(line) for line in text.split("\n")[:-1]]


def quick_requests() -> None:
    for _ in range(5):
        mpm.busy()
        time.sleep(0.05)
        mpm.idle()


def test_a_child_stuck_in_a_request_is_killed_its_stack_logged_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flag = tmp_path / "busy"
    m = MPM(start_servers=1, min_spare_servers=1, max_spare_servers=1, max_servers=2,
            overrides={"scaling.tick": 0.05, "mpm.request_timeout": 0.4, "pool.kill_grace": 0.2})
    caplog.set_level(logging.ERROR, logger="prefork.supervisor")
    try:
        end = time.monotonic() + 20
        first = None
        while time.monotonic() < end:
            m.whip_kids(stuck_in_a_request, (str(flag),), timeout=0.05)
            pids = _pids_written(flag)
            if first is None and pids:
                first = pids[0]
                t0 = time.monotonic()
            if first is not None and not pid_alive(first) and len(pids) >= 2:
                break
        assert first is not None, "no child got busy"
        assert not pid_alive(first), "the stuck child was not killed"
        assert time.monotonic() - t0 < 5.0
        assert len(_pids_written(flag)) >= 2, "no replacement took requests"
    finally:
        m.done()
    [record] = [r for r in caplog.records if f"worker {first} was busy" in r.getMessage()]
    text = record.getMessage()
    assert "mpm.request_timeout = 0.4 s" in text
    assert _digits_masked(text.splitlines()[0]) == _digits_masked(shown_line("worker ")), "the page shows another line"
    assert "deep_in_the_app" in text and "stuck_in_a_request" in text  # the child's Python stack
    assert m.stats()["workers"] == 0


def test_children_busy_less_long_than_the_timeout_are_never_killed(caplog: pytest.LogCaptureFixture) -> None:
    m = MPM(start_servers=2, min_spare_servers=1, max_spare_servers=2, max_servers=2,
            overrides={"scaling.tick": 0.05, "mpm.request_timeout": 1.0})
    caplog.set_level(logging.ERROR, logger="prefork.supervisor")
    try:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            m.whip_kids(quick_requests, (), timeout=0.05)
    finally:
        m.done()
    assert not [r for r in caplog.records if "was busy for" in r.getMessage()]


def idle_forever() -> None:
    while True:
        time.sleep(0.05)


def test_a_chain_reload_replaces_children_one_at_a_time_and_never_leaves_fewer_than_all_but_one() -> None:
    m = MPM(start_servers=3, min_spare_servers=3, max_spare_servers=3, max_servers=4,
            overrides={"scaling.tick": 0.05, "pool.graceful_timeout": 5.0})
    try:
        end = time.monotonic() + 10  # three children booted, not just forked (a slow machine boots them late)
        m.whip_kids(idle_forever, (), timeout=0.05)
        while m.status()["totals"]["idle"] < 3 and time.monotonic() < end:
            m.whip_kids(idle_forever, (), timeout=0.05)
        old = set(m.pids())
        assert len(old) == 3 and m.status()["totals"]["idle"] == 3
        m.reload(chain=True)
        most_stopping = 0
        fewest_serving = 3
        end = time.monotonic() + 20
        while old & set(m.pids()) and time.monotonic() < end:
            m.whip_kids(idle_forever, (), timeout=0.02)
            totals = m.status()["totals"]
            most_stopping = max(most_stopping, totals["stopping"])
            fewest_serving = min(fewest_serving, totals["idle"] + totals["busy"])
        assert not old & set(m.pids()), "not every child was replaced"
        assert most_stopping == 1, "children were replaced more than one at a time"
        assert fewest_serving >= 2
        exits = m.status()["totals"]["exits"]
        assert exits.get("reload") == 3
    finally:
        m.done()


def test_a_chain_reload_moves_on_when_the_policy_wants_no_replacement() -> None:
    """With min_spare = 0 the policy forks no replacement: each step waits for one look of the
    policy, not forever."""
    m = MPM(start_servers=3, min_spare_servers=0, max_spare_servers=3, max_servers=3,
            overrides={"scaling.tick": 0.05, "pool.graceful_timeout": 5.0})
    try:
        end = time.monotonic() + 10
        while len(m.pids()) < 3 and time.monotonic() < end:
            m.whip_kids(idle_forever, (), timeout=0.05)
        assert len(m.pids()) == 3
        m.reload(chain=True)
        end = time.monotonic() + 10
        while m.status()["totals"]["exits"].get("reload", 0) < 3 and time.monotonic() < end:
            m.whip_kids(idle_forever, (), timeout=0.02)
        assert m.status()["totals"]["exits"].get("reload", 0) == 3
    finally:
        m.done()


# -- docs/profiles/mpm.md, "Harakiri" and "Upgrades": its config and the lines it shows ------------------

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "profiles" / "mpm.md").read_text()


def _digits_masked(text: str) -> str:
    import re

    return re.sub(r"\d+(\.\d+)?", "N", text)


def test_the_harakiri_config_block_loads_as_it_says(tmp_path: Path) -> None:
    import re

    from prefork.config import load_config

    [toml] = re.findall(r"<!-- harakiri: config -->\n```toml\n(.*?)```", PAGE, re.S)
    (tmp_path / "prefork.toml").write_text(toml)
    assert load_config(tmp_path / "prefork.toml", {"profile": "mpm"}).mpm.request_timeout == 30.0


def shown_line(start: str) -> str:
    """The log line the page shows that starts so (docs/profiles/mpm.md)."""
    return next(line for line in PAGE.splitlines() if line.startswith(start) and " " in line)


def test_a_task_pool_refuses_request_timeout_instead_of_ignoring_it() -> None:
    import prefork

    with pytest.raises(prefork.ConfigError, match=r"mpm.request_timeout = 5: only a pool whose workers feed themselves"):
        prefork.Executor(1, overrides={"mpm.request_timeout": 5})
