"""prefork.MPM and prefork serve: the seed's behaviour point by point, and beyond."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prefork import hookimpl, mpm
from prefork.config import load_config
from prefork.mpm import MPM
from prefork.testing import descendants, pid_alive, wait_until

ROOT = Path(__file__).resolve().parent.parent
FAST = {"scaling.tick": 0.05}


def workers_of(pid: int, title: str = "prefork worker") -> list[int]:
    found = []
    for child in descendants(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if cmd == title:
            found.append(child)
    return found


def drive(m: MPM, code: Callable[..., Any], args: tuple[Any, ...], until: Callable[[], Any], timeout: float = 10) -> Any:
    """Run whip_kids until ``until()`` is true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = until()
        if value:
            return value
        assert time.monotonic() < end, "timed out driving the MPM"
        assert m.whip_kids(code, args) == 1


class Driver:
    """Drives an MPM's whip_kids loop in a thread, as a server's main loop would."""

    def __init__(self, m: MPM, code: Callable[..., Any], args: tuple[Any, ...] = ()) -> None:
        self.m = m
        self.thread = threading.Thread(target=self._loop, args=(code, args), daemon=True)
        self.thread.start()

    def _loop(self, code: Callable[..., Any], args: tuple[Any, ...]) -> None:
        while self.m.whip_kids(code, args):
            pass

    def stop(self) -> None:
        self.m.done()
        self.thread.join(20)
        assert not self.thread.is_alive()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock


# -- children's code ----------------------------------------------------------------------------


def echo_once(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        mpm.busy()
        with conn:
            data = conn.recv(65536)
            if data == b"hold":
                conn.recv(1)  # keeps this child busy until the client closes
            else:
                conn.sendall(data)
        mpm.idle()


def idle_forever() -> None:
    while True:
        time.sleep(0.05)


def yell_big(size: int, copies: int) -> None:
    for i in range(copies):
        mpm.yell({"pid": os.getpid(), "i": i, "blob": bytes([i % 256]) * size})
    mpm.exit(3, {"last": os.getpid()})


def note_and_idle(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    while True:
        time.sleep(0.05)


class Hooks:
    def __init__(self) -> None:
        self.items: list[tuple[int, Any, int | None]] = []
        self.lock = threading.Lock()

    def __call__(self, pid: int, data: Any, exitcode: int | None) -> None:
        with self.lock:
            self.items.append((pid, data, exitcode))


# -- the seed's synopsis ------------------------------------------------------------------------------


def test_echo_server_example_grows_under_load_and_shrinks_back() -> None:
    proc = subprocess.Popen([sys.executable, "examples/echo_server.py", "0", "0.05"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        wait_until(lambda: len(workers_of(proc.pid)) == 3, what="start_servers children")
        # an echo round trip
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"hello\n")
            assert c.recv(100) == b"hello\n"
            c.sendall(b"quit\n")
        # many clients at once, each keeping a child busy
        for _ in range(12):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"ping\n")
            clients.append(c)
        for c in clients:
            assert c.recv(100) == b"ping\n"
        peak = wait_until(lambda: (n := len(workers_of(proc.pid))) >= 14 and n, timeout=10, what="growth under load")
        assert peak <= 20  # max_servers
        for c in clients:
            c.sendall(b"quit\n")
            c.close()
        clients.clear()
        wait_until(lambda: 2 <= len(workers_of(proc.pid)) <= 4, timeout=10, what="back within the spare bounds")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "{'foo': 'bar'}" in out  # yelled by each child, shown by the data-hook process


# -- whip_kids, kid_new, done ------------------------------------------------------------------------------


def test_whip_kids_keeps_start_servers_and_returns_0_after_done() -> None:
    m = MPM(start_servers=3, min_spare_servers=1, max_spare_servers=5, max_servers=6, overrides=FAST)
    try:
        drive(m, idle_forever, (), lambda: m.stats()["idle"] == 3)
        assert len(m.pids()) == 3
    finally:
        m.done()
    assert m.whip_kids(idle_forever, ()) == 0
    assert m.kid_new() == -1


def test_surplus_idle_children_get_sigterm_one_per_tick() -> None:
    m = MPM(start_servers=6, min_spare_servers=1, max_spare_servers=2, max_servers=8, overrides=FAST)
    try:
        drive(m, idle_forever, (), lambda: len(m.pids()) == 6)
        first = set(m.pids())
        t0 = time.monotonic()
        drive(m, idle_forever, (), lambda: len(m.pids()) == 2, timeout=10)
        assert time.monotonic() - t0 >= 3 * 0.05  # four retirements, one per tick
        assert set(m.pids()) <= first  # retired, not replaced
    finally:
        m.done()


def test_busy_children_are_never_retired_and_max_servers_holds(tmp_path: Path) -> None:
    sock = listener()
    port = sock.getsockname()[1]
    m = MPM(start_servers=1, min_spare_servers=2, max_spare_servers=2, max_servers=5, overrides=FAST)
    held: list[socket.socket] = []
    try:
        with Driver(m, echo_once, (sock,)):
            wait_until(lambda: m.stats()["idle"] >= 2, what="two spares")
            for _ in range(7):  # more clients than max_servers
                c = socket.create_connection(("127.0.0.1", port), timeout=10)
                c.sendall(b"hold")
                held.append(c)
            wait_until(lambda: m.stats()["busy"] == 5, what="five busy children")
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                assert len(m.pids()) <= 5
            busy_pids = set(m.pids())
            for c in held:
                c.close()
            held.clear()
            wait_until(lambda: len(m.pids()) == 2, what="back to two spares")
            assert set(m.pids()) <= busy_pids  # the surplus left once idle; none was killed mid-request
    finally:
        for c in held:
            c.close()
        sock.close()


def test_kid_new_returns_the_pid_in_the_parent_and_0_in_the_child(tmp_path: Path) -> None:
    marks = tmp_path / "children"
    m = MPM(start_servers=2, min_spare_servers=1, max_spare_servers=3, max_servers=3, overrides=FAST)
    pids = []
    try:
        while len(pids) < 2:
            pid = m.kid_new()
            if pid == 0:  # the child goes on here, in this very function
                with open(marks, "a") as f:
                    f.write(f"{os.getpid()}\n")
                mpm.exit(0)
            assert pid is not None and pid > 0
            pids.append(pid)
        wait_until(lambda: marks.exists() and len(marks.read_text().split()) == 2, what="both children")
        assert sorted(int(p) for p in marks.read_text().split()) == sorted(pids)
    finally:
        m.done()
    assert m.kid_new() == -1


def test_done_from_a_signal_handler_stops_the_loop() -> None:
    m = MPM(start_servers=2, min_spare_servers=1, max_spare_servers=3, max_servers=3, overrides=FAST)
    old = signal.signal(signal.SIGUSR1, lambda s, f: m.done())
    try:
        drive(m, idle_forever, (), lambda: len(m.pids()) == 2)
        pids = m.pids()
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        end = time.monotonic() + 10
        while m.whip_kids(idle_forever, ()) and time.monotonic() < end:
            pass
        assert m.whip_kids(idle_forever, ()) == 0
        assert not any(pid_alive(p) for p in pids)
    finally:
        signal.signal(signal.SIGUSR1, old)
        m.done()


# -- data from children --------------------------------------------------------------------------------


@pytest.mark.parametrize("in_main", [True, False])
def test_large_data_from_several_children_arrives_whole(in_main: bool, tmp_path: Path) -> None:
    size, copies, children = 200_000, 3, 3
    if in_main:
        hooks = Hooks()
        hook: Callable[..., Any] = hooks
    else:
        out = tmp_path / "hook.log"

        def hook(pid: int, data: Any, exitcode: int | None) -> None:  # runs in the data-hook process
            ok = data.get("blob") is None or data["blob"] == bytes([data["i"] % 256]) * size
            with open(out, "a") as f:
                f.write(f"{pid} {exitcode} {ok} {'blob' in data}\n")

    m = MPM(start_servers=children, min_spare_servers=0, max_spare_servers=children, max_servers=children,
            child_data_hook=hook, data_hook_in_main=in_main, overrides=FAST)
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            m.whip_kids(yell_big, (size, copies), timeout=0.2)
            got = len(hooks.items) if in_main else (len(out.read_text().splitlines()) if out.exists() else 0)
            if got >= children * (copies + 1):
                break
    finally:
        m.done()
    if in_main:
        blobs = [(pid, d) for pid, d, code in hooks.items if code is None]
        assert len(blobs) >= children * copies
        assert all(d["blob"] == bytes([d["i"] % 256]) * size and d["pid"] == pid for pid, d in blobs)
        exits = [(pid, d, code) for pid, d, code in hooks.items if code is not None]
        assert all(code == 3 and d == {"last": pid} for pid, d, code in exits) and exits
    else:
        lines = [line.split() for line in out.read_text().splitlines()]
        assert all(ok == "True" for _, _, ok, _ in lines)
        assert any(code == "3" and blob == "False" for _, code, _, blob in lines)
        assert sum(1 for _, code, _, blob in lines if code == "None" and blob == "True") >= children * copies


def yell_pool(tag: str) -> None:
    mpm.yell({"pool": tag, "pid": os.getpid()})
    idle_forever()


@pytest.mark.parametrize("in_main", [True, False])
def test_two_mpms_from_one_config_each_get_only_their_own_childrens_data(in_main: bool, tmp_path: Path) -> None:
    out = tmp_path / "data"
    stepping = ["-"]  # the MPM the test drives now (in a data-hook process: the one that forked it)

    def hook(pid: int, data: Any, exitcode: int | None) -> None:
        with open(out, "a") as f:  # who received it, whose child sent it, the child's pid twice
            f.write(f"{os.getpid()}/{stepping[0]} {data['pool']} {pid} {data['pid']} {exitcode}\n")

    def lines() -> list[list[str]]:
        return [line.split() for line in out.read_text().splitlines()] if out.exists() else []

    config = load_config(overrides={
        **FAST, "profile": "mpm", "scaling.start_servers": 2, "scaling.min_spare": 0, "scaling.max_spare": 2,
        "scaling.max_servers": 2, "mpm.child_data_hook": hook, "mpm.data_hook_in_main": in_main,
    })
    registered = config.plugin_manager.list_name_plugin()
    pools = {"a": MPM.from_config(config), "b": MPM.from_config(config)}

    def step_both() -> bool:
        for tag, m in pools.items():
            stepping[0] = tag
            assert m.whip_kids(yell_pool, (tag,), timeout=0.02) == 1
        senders = lines()
        return all(len({sender for _, pool, _, sender, _ in senders if pool == tag}) == 2 for tag in pools)

    try:
        wait_until(step_both, timeout=15, what="data from both pools' children")
        children = {tag: set(m.pids()) for tag, m in pools.items()}
        assert config.plugin_manager.list_name_plugin() == registered  # nothing on the shared manager
    finally:
        for tag, m in pools.items():
            stepping[0] = tag
            m.done()  # delivers what is left (and waits for its data-hook process)
    received: dict[str, list[tuple[str, int, int, str]]] = {}
    for receiver, pool, pid, sender, code in lines():
        received.setdefault(receiver, []).append((pool, int(pid), int(sender), code))
    assert len(received) == 2, lines()
    for receiver, items in received.items():  # each pool's hook: its own children's data, once each
        tag = receiver.rpartition("/")[2]
        assert sorted(items) == sorted((tag, pid, pid, "None") for pid in children[tag]), (receiver, lines())
    assert config.plugin_manager.list_name_plugin() == registered


# -- child signals ------------------------------------------------------------------------------------


def on_hup(signum: int, frame: Any) -> None:
    with open(os.environ["HUP_LOG"], "a") as f:
        f.write(f"{os.getpid()} {signum}\n")


def test_child_sigh_installs_handlers_in_the_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "hup"
    monkeypatch.setenv("HUP_LOG", str(log))
    m = MPM(start_servers=2, min_spare_servers=0, max_spare_servers=2, max_servers=2, overrides=FAST,
            child_sigh={"HUP": on_hup, "USR1 USR2": "IGNORE", "TERM INT": "DEFAULT"})
    with Driver(m, idle_forever):
        wait_until(lambda: m.stats()["idle"] == 2, what="two children")
        pids = m.pids()
        for pid in pids:
            os.kill(pid, signal.SIGHUP)
            os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, what="both HUP handlers")
        assert all(pid_alive(p) for p in pids)  # USR1 ignored, HUP handled
        assert sorted(int(line.split()[0]) for line in log.read_text().splitlines()) == sorted(pids)


def test_a_bad_signal_name_is_a_config_error() -> None:
    with pytest.raises(Exception, match=r"mpm.child_sigh.TERM BOGUS = 'DEFAULT': 'BOGUS' is not a signal"):
        MPM(child_sigh={"TERM BOGUS": "DEFAULT"})


# -- only its own children ----------------------------------------------------------------------------------


def test_the_pool_waits_only_for_its_own_children() -> None:
    m = MPM(start_servers=2, min_spare_servers=0, max_spare_servers=2, max_servers=2, overrides=FAST)
    with Driver(m, idle_forever):
        wait_until(lambda: m.stats()["idle"] == 2, what="two children")
        other = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
        wait_until(lambda: not pid_alive(other.pid), what="the other child to exit")
        wait_until(lambda: m._sup is not None and m._sup.events > 0, what="the loop to run on")
        assert other.wait(10) == 7  # its exit status was left for its owner


# -- recycling ---------------------------------------------------------------------------------------------


HOG: list[bytes] = []


def hog_memory(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        mpm.busy()
        with conn:
            HOG.append(b"x" * (20 * 2**20))  # 20 MiB more per request
            conn.sendall(str(os.getpid()).encode())
        mpm.idle()


def serve_one(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(data)
        return c.recv(100)


def answer_pid(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        mpm.busy()
        with conn:
            conn.recv(100)
            conn.sendall(str(os.getpid()).encode())
        mpm.idle()


def test_max_requests_with_jitter_recycles_children() -> None:
    sock = listener()
    port = sock.getsockname()[1]
    m = MPM(start_servers=1, min_spare_servers=1, max_spare_servers=1, max_servers=1,
            overrides={**FAST, "pool.max_tasks_per_child": 3, "pool.max_tasks_jitter": 2})
    try:
        with Driver(m, answer_pid, (sock,)):
            pids = [int(serve_one(port, b"who")) for _ in range(20)]
    finally:
        sock.close()
    runs = [len(list(group)) for _, group in itertools.groupby(pids)]
    assert len(runs) >= 4
    assert all(3 <= n <= 5 for n in runs[:-1]), runs  # the last child may not have used its budget
    assert len(set(pids)) == len(runs)  # a recycled child never comes back


def test_a_child_whose_memory_grows_is_recycled() -> None:
    sock = listener()
    port = sock.getsockname()[1]
    m = MPM(start_servers=1, min_spare_servers=1, max_spare_servers=1, max_servers=1,
            overrides={**FAST, "pool.max_rss_mb": 30})
    try:
        with Driver(m, hog_memory, (sock,)):
            answered = [int(serve_one(port, b"go")) for _ in range(5)]
    finally:
        sock.close()
    # 20 MiB per request against a 30 MiB limit: each child serves two requests
    assert answered[0] == answered[1] != answered[2] == answered[3] != answered[4]


# -- the seed's function names ------------------------------------------------------------------------------


def test_pf_functions_wrap_a_module_level_mpm() -> None:
    assert mpm.pf_init(start_servers=2, min_spare_servers=0, max_spare_servers=2, max_servers=2, overrides=FAST)
    try:
        end = time.monotonic() + 10
        while len(mpm._global_mpm().pids()) < 2 and time.monotonic() < end:
            assert mpm.pf_whip_kids(idle_forever, []) == 1
        assert len(mpm._global_mpm().pids()) == 2
    finally:
        mpm.pf_done()
    assert not mpm.pf_init(max_spare_servers=-1)
    assert "scaling.max_spare = -1" in mpm.error


def test_child_functions_refuse_to_run_in_the_parent() -> None:
    with pytest.raises(RuntimeError, match="run in children"):
        mpm.busy()


# -- prefork serve -------------------------------------------------------------------------------------------


def start_serve(tmp_path: Path, *settings: str) -> tuple[subprocess.Popen[str], int]:
    (tmp_path / "app.py").write_text(
        "import os, time\n"
        "def handle(conn, addr):\n"
        "    data = conn.recv(100)\n"
        "    if data == b'slow':\n"
        "        time.sleep(1.0)\n"
        "    conn.sendall(str(os.getpid()).encode())\n"
    )
    cmd = [sys.executable, "-m", "prefork", "serve", "--set", "app=app:handle", "--set", "mpm.bind=127.0.0.1:0",
           "--set", "scaling.tick=0.05", "--set", "name=\"prefork-serve-test\"", *settings]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.rsplit(":", 1)[1])


def ask(port: int, data: bytes = b"hi") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(data)
        return int(c.recv(100))


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_answers_and_reloads_on_sighup(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, "--set", "scaling.start_servers=2", "--set", "scaling.min_spare=2",
                             "--set", "scaling.max_spare=3")
    try:
        wait_until(lambda: len(workers_of(proc.pid, "prefork-serve-test worker")) >= 2, what="children")
        old = set(workers_of(proc.pid, "prefork-serve-test worker"))
        assert ask(port) in old
        slow_answer: list[int] = []
        slow = threading.Thread(target=lambda: slow_answer.append(ask(port, b"slow")))
        slow.start()
        time.sleep(0.2)  # let a child take the slow request before the reload
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: not (old & set(workers_of(proc.pid, "prefork-serve-test worker"))), timeout=10,
                   what="the old children to leave")
        slow.join(10)
        assert slow_answer and slow_answer[0] in old  # it finished its connection before leaving
        new = ask(port)
        assert new not in old
    finally:
        _, err = stop(proc)
    assert proc.returncode == 0, err


def test_serve_scales_spares_on_sigttin_and_sigttou(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, "--set", "scaling.start_servers=1", "--set", "scaling.min_spare=1",
                             "--set", "scaling.max_spare=1")
    title = "prefork-serve-test worker"
    try:
        wait_until(lambda: len(workers_of(proc.pid, title)) == 1, what="one child")
        proc.send_signal(signal.SIGTTIN)
        wait_until(lambda: len(workers_of(proc.pid, title)) == 2, what="two children after SIGTTIN")
        proc.send_signal(signal.SIGTTIN)
        wait_until(lambda: len(workers_of(proc.pid, title)) == 3, what="three children after SIGTTIN")
        proc.send_signal(signal.SIGTTOU)
        wait_until(lambda: len(workers_of(proc.pid, title)) == 2, what="two children after SIGTTOU")
        assert ask(port) in workers_of(proc.pid, title)
    finally:
        _, err = stop(proc)
    assert proc.returncode == 0, err


def test_serve_needs_an_app(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "prefork", "serve", "--set", "mpm.bind=127.0.0.1:0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert "app is empty" in out.stderr


def test_prefork_run_hands_an_mpm_to_the_app(tmp_path: Path) -> None:
    (tmp_path / "kids.py").write_text(
        "import os, time\n"
        "from prefork import mpm\n"
        "def child(path):\n"
        "    open(os.path.join(path, str(os.getpid())), 'w').close()\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
        "def main(server):\n"
        "    end = time.monotonic() + 10\n"
        "    while len(os.listdir('marks')) < 3 and time.monotonic() < end:\n"
        "        server.whip_kids(child, ['marks'], timeout=0.1)\n"
        "    print('children', len(os.listdir('marks')))\n"
    )
    (tmp_path / "marks").mkdir()
    (tmp_path / "prefork.toml").write_text(
        'profile = "mpm"\napp = "kids:main"\n[scaling]\nstart_servers = 3\nmin_spare = 1\nmax_spare = 3\nmax_servers = 3\ntick = 0.05\n'
    )
    out = subprocess.run([sys.executable, "-m", "prefork", "run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "children 3" in out.stdout


# -- done() is re-entrant ------------------------------------------------------------------------------------

DONE_TWICE = """\
import os, signal, sys, time
from prefork import mpm

mode, mark = sys.argv[1], sys.argv[2]
seen = []
leaving = []


def note(text):
    with open(mark, "a") as f:
        f.write(text + "\\n")


def on_child_term(signum, frame):
    leaving.append(signum)


def child():
    end = time.monotonic() + 30
    while not leaving and time.monotonic() < end:
        time.sleep(0.01)
    mpm.exit(0, {"bye": os.getpid()})


def hook(pid, data, exitcode):
    if exitcode is None:
        return
    note("in hook")  # the final delivery, inside the first done()
    if mode == "hook":
        server.done()
        note("done returned")
    else:  # until a second SIGTERM ran its handler here
        end = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        note(f"signals seen: {len(seen)}")


def on_term(signum, frame):
    seen.append(signum)
    server.done(0)


server = mpm.MPM(start_servers=2, min_spare_servers=1, max_spare_servers=2, max_servers=2,
                 child_sigh={"TERM": on_child_term}, child_data_hook=hook, data_hook_in_main=True,
                 overrides={"scaling.tick": 0.05})
signal.signal(signal.SIGTERM, on_term)
ready = False
while server.whip_kids(child, ()):
    if not ready and server.stats()["idle"] == 2:
        ready = True
        print("ready", flush=True)
print("whip_kids returned", flush=True)
"""


@pytest.mark.parametrize("mode", ["signal", "hook"])
def test_a_second_done_while_done_runs_returns_and_sigterm_still_ends_the_process(mode: str, tmp_path: Path) -> None:
    """signal: a second SIGTERM (handler: done(0)) lands during the final data delivery of the
    first done(); hook: child_data_hook calls done() during that delivery.  Both used to
    deadlock on the step lock: the process then ignored SIGTERM."""
    (tmp_path / "done_twice.py").write_text(DONE_TWICE)
    mark = tmp_path / "mark"
    proc = subprocess.Popen([sys.executable, "done_twice.py", mode, str(mark)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: mark.exists() and "in hook" in mark.read_text(), what="the final delivery")
        if mode == "signal":
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "whip_kids returned" not in out  # done(0) exited, as the seed's pf_done(0)
    lines = mark.read_text().splitlines()
    if mode == "hook":
        assert lines.count("done returned") == 2, lines
    else:
        assert "signals seen: 2" in lines, lines


# -- a body's own socket errors are its failure --------------------------------------------------------------


class Exits:
    def __init__(self) -> None:
        self.items: list[tuple[int, int | None, str]] = []

    @hookimpl
    def prefork_worker_exited(self, worker: Any, status: int | None, reason: str) -> None:
        self.items.append((worker.pid, status, reason))


def reset_by_the_client(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    mpm.busy()
    conn.recv(100)  # the client resets the connection: ConnectionResetError, not caught here


def broken_pipe(sock: socket.socket) -> None:
    a, b = socket.socketpair()
    b.close()
    a.sendall(b"to nobody")  # BrokenPipeError, not caught here


@pytest.mark.parametrize(("body", "error"), [(reset_by_the_client, "ConnectionResetError"),
                                             (broken_pipe, "BrokenPipeError")])
def test_a_reset_or_broken_pipe_in_a_body_is_logged_and_fails_the_child(
    body: Callable[..., Any], error: str, capfd: pytest.CaptureFixture[str]
) -> None:
    sock = listener()
    port = sock.getsockname()[1]
    m = MPM(start_servers=1, min_spare_servers=0, max_spare_servers=1, max_servers=1, overrides=FAST)
    exits = Exits()
    m.config.plugin_manager.register(exits)
    client = None
    # the child's record, through a handler it inherits, to its stderr (which capfd reads)
    to_stderr = logging.StreamHandler(sys.stderr)
    logging.getLogger("prefork.worker").addHandler(to_stderr)
    try:
        with Driver(m, body, (sock,)):
            if body is reset_by_the_client:
                # connect once the pool (its fork server) has started: a process forked later
                # than the client socket would hold it, and close() would send no RST
                wait_until(lambda: m.pids(), what="the child")
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                wait_until(lambda: m.stats()["busy"] == 1, what="the child to take the connection")
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # an RST
            wait_until(lambda: exits.items, what="the child's exit")
    finally:
        logging.getLogger("prefork.worker").removeHandler(to_stderr)
        sock.close()
    pid, status, reason = exits.items[0]
    assert status is not None and os.waitstatus_to_exitcode(status) == 6, (status, reason)  # EXIT_BODY_FAILED
    assert reason != "the supervisor closed the channel"
    err = capfd.readouterr().err
    assert f"the body of worker {pid} failed; it exits with code 6" in err
    assert f"{error}: " in err  # with its traceback


# -- kid_new forks start_servers first ------------------------------------------------------------------------


def test_kid_new_forks_start_servers_children_first(tmp_path: Path) -> None:
    m = MPM(start_servers=4, min_spare_servers=1, max_spare_servers=5, max_servers=6, overrides=FAST)
    watchdog = threading.Timer(15, m.done)  # only when kid_new blocks for good (it used to after one child)
    watchdog.start()
    pids: list[int] = []
    try:
        while len(pids) < 4:
            pid = m.kid_new()
            if pid == 0:
                try:
                    idle_forever()
                finally:
                    os._exit(0)
            assert pid is not None and pid > 0, (pid, pids)
            pids.append(pid)
        assert m.stats()["spawned_total"] == 4
        assert m._sup is not None and m._sup.policy.min_spare == 1  # the start is over: the seed's bounds again
    finally:
        watchdog.cancel()
        m.done()
    assert len(set(pids)) == 4


# -- child_sigh may take SIGUSR2 -------------------------------------------------------------------------------


def usr2_note(signum: int, frame: Any) -> None:
    with open(os.environ["USR2_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")


def test_a_child_sigh_handler_for_sigusr2_wins_over_the_stack_dump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, started = tmp_path / "usr2", tmp_path / "started"
    monkeypatch.setenv("USR2_LOG", str(log))
    m = MPM(start_servers=2, min_spare_servers=0, max_spare_servers=2, max_servers=2, overrides=FAST,
            child_sigh={"USR2": usr2_note})
    with Driver(m, note_and_idle, (str(started),)):
        wait_until(lambda: started.exists() and len(started.read_text().split()) == 2, what="two children's code")
        pids = [int(p) for p in started.read_text().split()]
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        wait_until(lambda: log.exists() and len(log.read_text().split()) == 2, what="both SIGUSR2 handlers")
        assert sorted(int(p) for p in log.read_text().split()) == sorted(pids)
        assert all(pid_alive(p) for p in pids)


def test_a_kid_new_child_keeps_its_sigusr2_handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, started = tmp_path / "usr2", tmp_path / "started"
    monkeypatch.setenv("USR2_LOG", str(log))
    m = MPM(start_servers=1, min_spare_servers=1, max_spare_servers=1, max_servers=1, overrides=FAST,
            child_sigh={"USR2": usr2_note})
    try:
        pid = m.kid_new()
        if pid == 0:
            try:
                note_and_idle(str(started))
            finally:
                os._exit(0)
        assert pid
        wait_until(lambda: started.exists() and started.read_text().split() == [str(pid)], what="the child's code")
        os.kill(pid, signal.SIGUSR2)
        wait_until(lambda: log.exists() and log.read_text().split() == [str(pid)], what="the SIGUSR2 handler")
        assert pid_alive(pid)
    finally:
        m.done()


# -- pf_kid_yell as in the seed -------------------------------------------------------------------------------


def yell_results(path: str) -> None:
    ok = mpm.pf_kid_yell({"from": os.getpid()})
    bad = mpm.pf_kid_yell(threading.Lock())  # cannot be serialized
    with open(path, "w") as f:
        f.write(f"{ok} {bad} {'cannot be serialized' in mpm.error}\n")
    idle_forever()


def test_pf_kid_yell_returns_true_in_a_child_and_is_a_no_op_in_the_parent(tmp_path: Path) -> None:
    assert mpm.pf_kid_yell({"x": 1}) is None  # the main process: a no-op, as in the seed
    out = tmp_path / "yell"
    hooks = Hooks()
    m = MPM(start_servers=1, min_spare_servers=0, max_spare_servers=1, max_servers=1, overrides=FAST,
            child_data_hook=hooks, data_hook_in_main=True)
    with Driver(m, yell_results, (str(out),)):
        wait_until(lambda: out.exists() and out.read_text().endswith("\n"), what="the child's report")
        wait_until(lambda: hooks.items, what="the data")
    assert out.read_text() == "True None True\n"
    assert [data for _, data, _ in hooks.items] == [{"from": hooks.items[0][0]}]


def yell_and_leave() -> None:
    mpm.yell({"hello": os.getpid()})
    mpm.exit(0)


def test_done_waits_for_a_hung_data_hook_process_only_a_bounded_time(tmp_path: Path) -> None:
    """A child_data_hook that never returns (in its own process) cannot hold ``done()``
    forever: after graceful_timeout it gets SIGTERM, kill_grace later SIGKILL; no zombie is left."""
    started = tmp_path / "hook.pid"

    def hook(pid: int, data: Any, exitcode: int | None) -> None:  # runs in the data-hook process
        started.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # deaf to the polite ask: SIGKILL must come
        while True:
            time.sleep(1)

    m = MPM(start_servers=1, min_spare_servers=0, max_spare_servers=1, max_servers=1, child_data_hook=hook,
            data_hook_in_main=False, overrides={**FAST, "pool.graceful_timeout": 0.3, "pool.kill_grace": 0.3})
    try:
        end = time.monotonic() + 10
        # the file exists before its pid is written in it: wait for the pid
        while not (started.exists() and started.read_text()) and time.monotonic() < end:
            m.whip_kids(yell_and_leave, (), timeout=0.1)  # the loop runs in whip_kids: it forwards the data
        hook_pid = int(started.read_text())
    except BaseException:
        m.done()  # bounded now, whatever the hook does
        raise
    t0 = time.monotonic()
    m.done()
    assert time.monotonic() - t0 < 5.0
    assert not pid_alive(hook_pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(hook_pid, os.WNOHANG)  # reaped, not a zombie


def _kept_alive_forever() -> None:
    mpm.busy()
    mpm.idle(keepalive=True)  # a request answered; the child waits on its client's connection
    while True:
        signal.pause()


def test_mpm_idle_keepalive_marks_the_child_kept_alive_not_idle() -> None:
    """The seed-style module function takes keepalive= as WorkerHandle.idle does: such a
    child is no spare, so the spare policy forks another beside it."""
    m = MPM(start_servers=1, min_spare_servers=1, max_spare_servers=1, max_servers=2, overrides=FAST)
    try:
        drive(m, _kept_alive_forever, (), lambda: len(m.pids()) == 2)
        states = [w["state"] for w in m.status()["workers"]]
        assert "keepalive" in states and "idle" not in states, states
    finally:
        m.done()
