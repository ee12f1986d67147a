"""The prefork command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def prefork(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefork", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def test_run_the_repository_default_job() -> None:
    out = prefork("run")
    assert out.returncode == 0, out.stderr
    assert "664579 primes below 10,000,000" in out.stdout


def test_run_with_set_overrides() -> None:
    out = prefork("run", "--set", "scaling.workers=1")
    assert out.returncode == 0, out.stderr
    assert "on 1 workers" in out.stdout


def test_check_prints_the_merged_config() -> None:
    out = prefork("check", "--set", "pool.kill_grace=0.5")
    assert out.returncode == 0, out.stderr
    assert 'app = "examples.primes:main"' in out.stdout
    assert "kill_grace = 0.5" in out.stdout
    assert "OK: profile 'executor'" in out.stderr


def test_plugins_lists_strategies_by_plugin() -> None:
    out = prefork("plugins")
    assert out.returncode == 0, out.stderr
    assert "prefork.strategies.scaling" in out.stdout
    assert "scaling 'spare'" in out.stdout
    assert "transport 'pipe'" in out.stdout


def test_config_errors_exit_2_naming_file_key_and_reason(tmp_path: Path) -> None:
    (tmp_path / "prefork.toml").write_text('profile = "mpm"\n[scaling]\nmax_spare = -1\n')
    out = prefork("check", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "prefork: error: prefork.toml: scaling.max_spare = -1: must be >= 1"


def test_unknown_key_gets_did_you_mean(tmp_path: Path) -> None:
    (tmp_path / "prefork.toml").write_text("[pool]\nmax_task_per_child = 3\n")
    out = prefork("check", cwd=tmp_path)
    assert out.returncode == 2
    assert "pool.max_task_per_child" in out.stderr and "did you mean 'max_tasks_per_child'" in out.stderr


def test_run_without_app_says_so(tmp_path: Path) -> None:
    (tmp_path / "prefork.toml").write_text('profile = "executor"\n')
    out = prefork("run", cwd=tmp_path)
    assert out.returncode == 2
    assert "app is empty" in out.stderr


def test_run_with_an_app_that_cannot_be_imported(tmp_path: Path) -> None:
    (tmp_path / "prefork.toml").write_text('app = "nowhere_module:main"\n')
    out = prefork("run", cwd=tmp_path)
    assert out.returncode == 2
    assert "app = 'nowhere_module:main': cannot import it" in out.stderr


def test_bad_set_syntax(tmp_path: Path) -> None:
    out = prefork("check", "--set", "novalue", cwd=tmp_path)
    assert out.returncode == 2
    assert "expected key=value" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_cleanly_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "slowapp.py").write_text(textwrap.dedent("""
        import sys, time

        def main(pool):
            futures = [pool.submit(time.sleep, 30) for _ in range(6)]
            print("ready", pool.pids(), flush=True)
            futures[0].result()
    """))
    (tmp_path / "prefork.toml").write_text('name = "prefork-clitest"\napp = "slowapp:main"\n[scaling]\nname = "fixed"\nworkers = 2\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefork", "run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line + proc.stderr.read()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err
