"""`prefork serve` under signal storms, with a server that must always keep a child,
and against idle clients: a real server subprocess, real signals, real sockets."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefork.testing import descendants, pid_alive, wait_until

ROOT = Path(__file__).resolve().parent.parent
NAME = "prefork-storm"
TITLE = f"{NAME} worker"
MAX_SERVERS = 4

APP = """\
import os

def handle(conn, addr):
    with conn.makefile("rb") as lines:
        line = lines.readline()
    conn.sendall(b"%d %s" % (os.getpid(), line))
"""


def start_serve(tmp_path: Path, *settings: str) -> tuple[subprocess.Popen[str], int]:
    (tmp_path / "lineapp.py").write_text(APP)
    cmd = [sys.executable, "-m", "prefork", "serve", "--set", "app=lineapp:handle", "--set", "mpm.bind=127.0.0.1:0",
           "--set", "scaling.tick=0.05", "--set", f'name="{NAME}"', *settings]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        _, err = stop(proc)
        pytest.fail(f"prefork serve did not start: {line!r}\n{err}")
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[str, str]:
    """SIGTERM, then wait at most ``timeout`` s; a server still there is killed (and the test fails)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: its stack goes to stderr first
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
        raise AssertionError(f"prefork serve ignored SIGTERM for {timeout} s\n{err}") from None


def workers(proc: subprocess.Popen[str]) -> set[int]:
    found = set()
    for pid in descendants(proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if cmd == TITLE:
            found.add(pid)
    return found


def ask(port: int, text: str = "hi", timeout: float = 10) -> int:
    """One request: a line out, "<pid> <line>" back; the pid of the child that answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(text.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = c.recv(100)
            assert chunk, f"connection closed without an answer (got {answer!r})"
            answer += chunk
    pid, echoed = answer.decode().split(" ", 1)
    assert echoed == text + "\n"
    return int(pid)


def storm(pid: int, kinds: list[signal.Signals], seed: int, seconds: float = 1.0, most: int = 500) -> int:
    """A signal every ~2 ms for ``seconds`` (at most ``most``), chosen at random from ``kinds``."""
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    sent = 0
    while sent < most and time.monotonic() < end:
        os.kill(pid, rng.choice(kinds))
        sent += 1
        time.sleep(0.002)  # the storm's pace, not a wait for anything
    return sent


class Clients:
    """Requests one after another from a thread while a storm blows; each must be answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i in range(2000):  # bounded in count as well as by stop()
            if self._stop.is_set():
                return
            try:
                ask(self.port, f"during the storm {i}")
                self.answered += 1
            except (OSError, AssertionError, ValueError) as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive()


HUP, TTIN, TTOU = signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU
STORMS = {"hup": [HUP], "ttin": [TTIN], "ttou": [TTOU], "mixed": [HUP, TTIN, TTOU]}


@pytest.mark.parametrize("kind", list(STORMS))
def test_a_signal_storm_leaves_a_server_that_answers_reloads_and_stops(kind: str, tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, "--set", "scaling.start_servers=2", "--set", "scaling.min_spare=1",
                             "--set", "scaling.max_spare=2", "--set", f"scaling.max_servers={MAX_SERVERS}")
    try:
        wait_until(lambda: workers(proc), what="a first child")
        for run in range(3):  # the old failure came in 3 runs out of 4: several storms per server
            clients = Clients(port)
            try:
                sent = storm(proc.pid, STORMS[kind], seed=run)
            finally:
                clients.stop()
            assert sent > 100
            assert proc.poll() is None, f"the server died in storm {run}: {proc.communicate(timeout=10)[1]}"
            assert not clients.failures, clients.failures[:3]
            assert clients.answered > 0
            # the count comes back within bounds: never none, never more than max_servers
            wait_until(lambda: 1 <= len(workers(proc)) <= MAX_SERVERS, what=f"1..{MAX_SERVERS} children")
            assert ask(port)
            # and the loop still acts on signals: one more SIGHUP replaces every child
            old = workers(proc)
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda old=old: (now := workers(proc)) and not now & old, what="every child replaced after SIGHUP")
            assert ask(port) not in old
    finally:
        every = descendants(proc.pid)
        _, err = stop(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    wait_until(lambda: not any(pid_alive(p) for p in every), timeout=5, what="every child of the server to be gone")


def test_sigterm_during_a_storm_stops_the_server(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, "--set", "scaling.start_servers=2", "--set", "scaling.min_spare=1",
                             "--set", "scaling.max_spare=2", "--set", f"scaling.max_servers={MAX_SERVERS}")
    try:
        wait_until(lambda: workers(proc), what="a first child")
        assert ask(port)
        every = descendants(proc.pid)
        storm(proc.pid, [HUP, TTIN, TTOU], seed=7, seconds=0.3)
        t0 = time.monotonic()
        _, err = stop(proc)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    wait_until(lambda: not any(pid_alive(p) for p in every | descendants(os.getpid())), timeout=5,
               what="every child of the server to be gone")


# -- a server always has a child to accept ------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("scaling.min_spare", 0), ("scaling.start_servers", 0)])
def test_a_setting_that_leaves_no_child_is_refused_in_one_line(key: str, value: int, tmp_path: Path) -> None:
    (tmp_path / "lineapp.py").write_text(APP)
    (tmp_path / "prefork.toml").write_text(f'profile = "mpm"\napp = "lineapp:handle"\n[mpm]\nbind = "127.0.0.1:0"\n'
                                          f'[scaling]\n{key.split(".")[1]} = {value}\n')
    out = subprocess.run([sys.executable, "-m", "prefork", "serve"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"prefork: error: prefork.toml: {key} = {value}: prefork serve needs at least 1")
    assert "listening" not in out.stdout


def test_sigttou_never_takes_the_last_child_and_a_reload_forks_new_ones(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, "--set", "scaling.start_servers=1", "--set", "scaling.min_spare=1",
                             "--set", "scaling.max_spare=1", "--set", "scaling.max_servers=2")
    try:
        first = wait_until(lambda: workers(proc), what="one child")
        for sig in (TTOU, TTOU, HUP):  # handled in this order: min_spare would have reached 0 before the reload
            proc.send_signal(sig)
        wait_until(lambda: (now := workers(proc)) and not now & first, what="a new child after the reload")
        assert ask(port, timeout=5) not in first
    finally:
        _, err = stop(proc)
    assert proc.returncode == 0, err
    assert "SIGTTOU changed nothing: the least a server keeps is 1" in err


def test_a_sigterm_handler_in_child_sigh_is_refused(tmp_path: Path) -> None:
    (tmp_path / "lineapp.py").write_text(APP)
    out = subprocess.run([sys.executable, "-m", "prefork", "serve", "--set", "app=lineapp:handle",
                          "--set", "mpm.bind=127.0.0.1:0", "--set", 'mpm.child_sigh={"TERM INT" = "IGNORE"}'],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        "prefork: error: keyword arguments: mpm.child_sigh.TERM INT = 'IGNORE': prefork serve's children handle "
        "SIGTERM themselves (finish the connection, then leave); set a handler for another signal"
    )


# -- idle clients ---------------------------------------------------------------------------------------


def test_idle_clients_holding_every_child_do_not_block_a_normal_client(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, "--set", "scaling.start_servers=2", "--set", "scaling.min_spare=1",
                             "--set", "scaling.max_spare=2", "--set", "scaling.max_servers=2",
                             "--set", "mpm.read_timeout=0.5")
    silent: list[socket.socket] = []
    try:
        wait_until(lambda: len(workers(proc)) == 2, what="two children")
        for _ in range(2):  # as many idle clients as max_servers, connected first: accepted first
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        t0 = time.monotonic()
        assert ask(port, "a normal client", timeout=5) in workers(proc)
        assert time.monotonic() - t0 < 5
        for c in silent:  # the idle clients were cut off, not answered
            assert c.recv(100) == b""
    finally:
        for c in silent:
            c.close()
        _, err = stop(proc)
    assert proc.returncode == 0, err
    assert err.count("waited longer than mpm.read_timeout = 0.5 s") == 2, err


@pytest.mark.parametrize(("value", "reason"), [("-1", "must be >= 0"), ('"soon"', "must be a number")])
def test_a_bad_read_timeout_is_one_line(value: str, reason: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "prefork", "serve", "--set", "app=x:y",
                          "--set", f"mpm.read_timeout={value}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    shown = "-1.0" if value == "-1" else "'soon'"
    assert out.stderr.strip() == f"prefork: error: keyword arguments: mpm.read_timeout = {shown}: {reason}"


@pytest.mark.parametrize(("app", "reason"), [("nomod:handle", "cannot import it: No module named 'nomod'"),
                                             ("lineapp:APP", "str is not callable")])
def test_an_app_that_cannot_serve_is_one_line(app: str, reason: str, tmp_path: Path) -> None:
    (tmp_path / "lineapp.py").write_text(APP + f"APP = {APP!r}\n")
    out = subprocess.run([sys.executable, "-m", "prefork", "serve", "--set", f"app={app}", "--set", "mpm.bind=127.0.0.1:0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"prefork: error: keyword arguments: app = {app!r}: {reason}")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
