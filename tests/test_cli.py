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


PROGRESS_APP = '''
import time

def main(pool):
    for f in [pool.submit(abs, -i) for i in range(20)]:
        f.result()
    return 0

main.progress_total = 20
'''


def test_run_shows_a_bar_for_an_app_that_declares_its_total(tmp_path: Path) -> None:
    (tmp_path / "barapp.py").write_text(PROGRESS_APP)
    (tmp_path / "prefork.toml").write_text('app = "barapp:main"\n[scaling]\nworkers = 2\n')
    out = prefork("run", "--progress", "force", "--set", "control.enabled=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "20/20" in out.stderr, out.stderr
    quiet = prefork("run", "--set", "control.enabled=false", cwd=tmp_path)  # auto on a pipe: no bar
    assert quiet.returncode == 0 and "20/20" not in quiet.stderr, quiet.stderr


def test_a_bad_progress_total_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "barapp.py").write_text(PROGRESS_APP.replace("= 20", '= "lots"'))
    (tmp_path / "prefork.toml").write_text('app = "barapp:main"\n')
    out = prefork("run", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("prefork: error: app = 'barapp:main': ") and len(out.stderr.strip().splitlines()) == 1


WAITING_APP = '''
import os, time

def hold(path):
    end = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.02)

def main(pool):
    fut = pool.submit(hold, os.environ["GO_FILE"])
    open(os.environ["READY_FILE"], "w").close()
    fut.result()
    return 0
'''


def test_run_listens_on_a_control_socket_named_after_the_app_and_removes_it(tmp_path: Path) -> None:
    """``prefork run`` turns the control socket on: ``prefork status`` from another process sees
    the app's pool by the app's name, its busy worker and the task's method; when the app ends,
    no socket is left."""
    import time

    (tmp_path / "waitapp.py").write_text(WAITING_APP)
    (tmp_path / "prefork.toml").write_text('app = "waitapp:main"\n[scaling]\nworkers = 2\n[pool]\nkill_grace = 0.2\n')
    sockets = tmp_path / "run"
    sockets.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(sockets), "READY_FILE": str(tmp_path / "ready"), "GO_FILE": str(tmp_path / "go")}
    proc = subprocess.Popen([sys.executable, "-m", "prefork", "run"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 20
        while not (tmp_path / "ready").exists() and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "ready").exists(), proc.communicate(timeout=10)
        sock = sockets / "prefork" / "waitapp.sock"
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
        status = subprocess.run([sys.executable, "-m", "prefork", "status", "waitapp", "--json"], env=env,
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        import json

        snap = json.loads(status.stdout)
        assert snap["name"] == "waitapp" and snap["pid"] == proc.pid
        wait_busy = time.monotonic() + 10
        while snap["totals"]["busy"] != 1 and time.monotonic() < wait_busy:
            snap = json.loads(subprocess.run([sys.executable, "-m", "prefork", "status", "waitapp", "--json"], env=env,
                                             capture_output=True, text=True, timeout=30).stdout)
        busy = [w for w in snap["workers"] if w["state"] == "busy"]
        assert busy and busy[0]["method"] == "waitapp:hold"
        (tmp_path / "go").touch()
        assert proc.wait(timeout=30) == 0, proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists(), "the control socket was left behind"
