"""``prefork serve`` upgraded and reloaded under load: SIGUSR2 starts a new master that
inherits the socket; the old one drains once the new one is ready; a broken new version
leaves the old one serving.  A client hammering the server across it sees no refused or
reset connection."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from prefork.testing import pid_alive, wait_until

ROOT = Path(__file__).resolve().parent.parent
NAME = "upgraded"

APP = """\
import os
VERSION = {version!r}

def handle(conn, addr):
    with conn.makefile("rb") as lines:
        lines.readline()
    conn.sendall(b"%d %s\\n" % (os.getpid(), VERSION.encode()))
"""


def start(tmp_path: Path, version: str) -> tuple[subprocess.Popen[str], int]:
    (tmp_path / "upapp.py").write_text(APP.format(version=version))
    cmd = [sys.executable, "-m", "prefork", "serve", "--set", "app=upapp:handle", "--set", "mpm.bind=127.0.0.1:0",
           "--set", "scaling.tick=0.05", "--set", "scaling.start_servers=2", "--set", "scaling.min_spare=2",
           "--set", "scaling.max_spare=3", "--set", f'name="{NAME}"']
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, proc.communicate(timeout=10)
    return proc, int(line.rsplit(":", 1)[1])


def ask(port: int) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"hi\n")
        pid, version = c.makefile().readline().split()
    return int(pid), version


class Hammer:
    """A client asking in a loop; every failure is kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.versions.append(ask(self.port)[1])
            except (OSError, ValueError) as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def masked(text: str) -> str:
    import re

    return re.sub(r"\d+", "N", text)


def master_pid() -> int:
    out = subprocess.run([sys.executable, "-m", "prefork", "status", NAME, "--json"], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return int(json.loads(out.stdout)["pid"]) if out.returncode == 0 else 0


def stop_master(pid: int) -> None:
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), timeout=20, what=f"master {pid} to stop")


def test_sigusr2_hands_the_socket_to_a_new_master_with_no_failed_connection(tmp_path: Path) -> None:
    proc, port = start(tmp_path, "v1")
    new = 0
    try:
        wait_until(lambda: ask(port)[1] == "v1", what="v1 answering")
        wait_until(lambda: master_pid() == proc.pid, what="the old master's control socket")
        hammer = Hammer(port)
        try:
            wait_until(lambda: len(hammer.versions) >= 20, what="v1 answers under load")
            (tmp_path / "upapp.py").write_text(APP.format(version="v2"))  # the new code on disk
            proc.send_signal(signal.SIGUSR2)
            assert proc.wait(timeout=30) == 0, proc.communicate(timeout=10)  # the old master drained and left
            wait_until(lambda: "v2" in hammer.versions[-5:], what="v2 answering")
        finally:
            hammer.stop()
        assert not hammer.failures, hammer.failures[:3]
        assert "v1" in hammer.versions and hammer.versions[-1] == "v2"
        new = wait_until(master_pid, what="the new master's control socket")
        assert new != proc.pid and pid_alive(new)
        assert ask(port)[1] == "v2"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_master(new or master_pid())


def test_a_broken_new_version_leaves_the_old_master_serving(tmp_path: Path) -> None:
    proc, port = start(tmp_path, "v1")
    err: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_until(lambda: ask(port)[1] == "v1", what="v1 answering")
        (tmp_path / "upapp.py").write_text("raise ImportError('the new release is broken')\n")
        hammer = Hammer(port)
        try:
            proc.send_signal(signal.SIGUSR2)
            wait_until(lambda: any("upgrade failed" in line for line in err), timeout=30, what="the failure logged")
            wait_until(lambda: master_pid() == proc.pid, timeout=30, what="the old master taking its control socket back")
        finally:
            hammer.stop()
        assert not hammer.failures, hammer.failures[:3]
        assert proc.poll() is None and ask(port)[1] == "v1"
        [line] = [line for line in err if "upgrade failed" in line]
        assert "exit code" in line and "keeps serving" in line
        page = (ROOT / "docs" / "profiles" / "mpm.md").read_text()
        shown = next(text for text in page.splitlines() if text.startswith("upgrade failed:"))
        assert masked(line[line.index("upgrade failed:"):].strip()) == masked(shown), "the page shows another line"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(10)


def test_prefork_ctl_upgrade_does_what_sigusr2_does(tmp_path: Path) -> None:
    proc, port = start(tmp_path, "v1")
    new = 0
    try:
        wait_until(lambda: master_pid() == proc.pid, what="the old master's control socket")
        (tmp_path / "upapp.py").write_text(APP.format(version="v2"))
        out = subprocess.run([sys.executable, "-m", "prefork", "ctl", NAME, "upgrade"], capture_output=True, text=True,
                             timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == (f"pool '{NAME}': upgrade: a new master is starting on the same socket; "
                                      "this one drains once it is ready")
        assert proc.wait(timeout=30) == 0
        new = wait_until(master_pid, what="the new master's control socket")
        assert new != proc.pid and ask(port)[1] == "v2"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_master(new or master_pid())


def test_ctl_upgrade_is_refused_by_a_pool_that_cannot_upgrade_itself() -> None:
    import prefork
    from prefork.cli import main

    with prefork.Executor(1, control=True, overrides={"name": "plainpool"}) as ex:
        ex.submit(abs, -1).result(10)
        err = subprocess.run([sys.executable, "-m", "prefork", "ctl", "plainpool", "upgrade"], capture_output=True,
                             text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert err.returncode == 2
        assert "cannot upgrade itself: only `prefork serve` starts a new master" in err.stderr
        assert len(err.stderr.strip().splitlines()) == 1
        assert main(["status", "plainpool", "--json"]) == 0  # the pool is untouched
