"""The control socket (``prefork.control``), ``prefork status`` and ``prefork ctl``
(``prefork._control_cli``): real pools, real sockets, hostile clients."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import CancelledError
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork._control_cli import CLEAR, add_ctl_parser, add_status_parser, format_duration, render_status, watch
from prefork._control_protocol import _BadRequest, _parse_request
from prefork._supervisor import Supervisor
from prefork.config import load_config
from prefork.control import (
    MAX_REQUEST,
    ControlServer,
    default_directory,
    fetch_status,
    list_pools,
    request,
    socket_path,
)
from prefork.errors import ConfigError
from prefork.testing import pid_alive, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "control.md"
NOBODY = 65534


def napping(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_pool(directory: Path | None, name: str = "web", workers: int = 2, timeout: float = 2.0, **overrides: Any) -> Iterator[tuple[Supervisor, ControlServer]]:
    """A started pool (fixed policy unless overridden) with its control server, both closed after."""
    fixed = {} if "scaling.name" in overrides else {"scaling.name": "fixed", "scaling.workers": workers}
    settings_ = {"name": name, **fixed, **overrides}
    sup = Supervisor(load_config(None, settings_))
    sup.start()
    server: ControlServer | None = None
    try:
        server = ControlServer(sup, name, directory=directory, timeout=timeout).start()
        yield sup, server
    finally:
        if server is not None:
            server.close()
        sup.shutdown(wait=True, cancel_futures=True, force=True)


def cli(*argv: str) -> int:
    """``prefork ARGV`` (the real command's entry point)."""
    from prefork.cli import main

    return main(list(argv))


def normalized(status: Mapping[str, Any]) -> dict[str, Any]:
    """A status without what changes from one instant to the next (times, memory)."""
    out = {k: v for k, v in status.items() if k not in ("uptime",)}
    out["workers"] = [{k: v for k, v in w.items() if k not in ("age", "rss", "running_for")} for w in status["workers"]]
    return out


def raw_exchange(path: Path, payload: bytes, timeout: float = 5.0, half_close: bool = False) -> bytes:
    """Send ``payload`` as it is (then end the stream with ``half_close``); the first line
    answered (or b'' at end of stream)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        return read_line(s)


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        buf += data
    return buf.partition(b"\n")[0]


def answer_of(path: Path, payload: bytes, half_close: bool = False) -> dict[str, Any]:
    line = raw_exchange(path, payload, half_close=half_close)
    assert line, f"no answer to {payload[:60]!r}"
    answer: dict[str, Any] = json.loads(line)
    assert answer["v"] == 1
    return answer


def timed_status(name: str, directory: Path) -> float:
    began = time.monotonic()
    assert fetch_status(name, directory=directory, timeout=5.0)["name"] == name
    return time.monotonic() - began


@pytest.fixture
def ctl_dir(tmp_path: Path) -> Path:
    return tmp_path / "ctl"


# -- the socket, its directory, its file mode --------------------------------------------------


def test_socket_is_0600_in_a_0700_directory_and_close_removes_it(ctl_dir: Path) -> None:
    with running_pool(ctl_dir) as (_sup, server):
        assert server.path == ctl_dir / "web.sock"
        assert stat.S_IMODE(os.stat(ctl_dir).st_mode) == 0o700
        mode = os.lstat(server.path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert sorted(os.listdir(ctl_dir)) == ["web.sock"]  # the temporary name is gone
        assert [p.name for p in list_pools(ctl_dir)] == ["web"] and list_pools(ctl_dir)[0].pid == os.getpid()
        server.close()
        assert os.listdir(ctl_dir) == []
        server.close()  # twice is fine


def test_default_directory_is_xdg_runtime_dir_else_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_directory() == tmp_path / "prefork"
    assert socket_path("web") == tmp_path / "prefork" / "web.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert default_directory() == Path(f"/tmp/prefork-{os.geteuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert default_directory() == Path(f"/tmp/prefork-{os.geteuid()}")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_directory() == Path(f"/tmp/prefork-{os.geteuid()}")


def test_a_pool_started_with_no_directory_uses_the_default_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with running_pool(None, name="dflt") as (_sup, server):
        assert server.path == tmp_path / "prefork" / "dflt.sock"
        assert fetch_status("dflt")["pid"] == os.getpid()


@pytest.mark.parametrize("kind", ["symlink", "group-writable", "world-writable", "file", "other-owner"])
def test_an_unsafe_directory_is_refused_with_one_line(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "ctl"
    if kind == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "real")
        why = "is a symbolic link"
    elif kind == "file":
        target.write_text("")
        why = "is not a directory"
    else:
        target.mkdir(mode=0o700)
        if kind == "group-writable":
            os.chmod(target, 0o770)
            why = "is writable by group or others (mode 0770)"
        elif kind == "world-writable":
            os.chmod(target, 0o1777)
            why = "is writable by group or others (mode 1777)"
        else:
            if os.geteuid() != 0:
                pytest.skip("needs root to give a directory to another user")
            os.chown(target, NOBODY, NOBODY)
            why = f"belongs to uid {NOBODY}, not to you (uid 0)"
    sup = Supervisor(load_config(None, {"name": "web", "scaling.name": "fixed", "scaling.workers": 1}))
    with pytest.raises(ConfigError) as err:
        ControlServer(sup, "web", directory=target).start()
    assert str(err.value) == (
        f"control directory {target} {why}; remove or fix it (it must be a directory of yours "
        "that no one else may write, mode 0700)"
    )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "-x", "sp ace", "é", "x" * 65, "nul\x00"])
def test_a_name_that_cannot_be_a_file_name_is_refused(ctl_dir: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="cannot name a control socket"):
        socket_path(name, ctl_dir)
    with pytest.raises(ConfigError, match="cannot name a control socket"):
        request(name, "status", directory=ctl_dir)


def test_a_socket_path_longer_than_a_unix_socket_holds_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    with pytest.raises(ConfigError, match=r"bytes long; a Unix socket path holds at most 107"):
        socket_path("web", deep)
    # the name fits, the temporary name the socket is bound under first does not
    directory = tmp_path / ("d" * (95 - len(str(tmp_path)) - 1))
    assert len(str(directory)) == 95 and len(str(socket_path("web", directory))) <= 107
    sup = _FakePool("web")
    with pytest.raises(ConfigError, match=rf"^control directory {directory} is too long: a socket in it needs \d+ bytes"):
        ControlServer(sup, "web", directory=directory).start()


# -- the operations -------------------------------------------------------------------------------


def test_status_over_the_socket_matches_the_pools_own(ctl_dir: Path) -> None:
    with running_pool(ctl_dir) as (sup, _server):
        wait_until(lambda: sup.status()["totals"]["idle"] == 2, what="two idle workers")
        for f in [sup.submit(abs, (-i,)) for i in range(5)]:
            f.result(10)
        remote = fetch_status("web", directory=ctl_dir)
        here = sup.status()
        assert normalized(remote) == normalized(here)
        assert remote["totals"]["completed"] == 5 and remote["pid"] == os.getpid()
        answer = request("web", "status", directory=ctl_dir)
        assert answer["ok"] is True and answer["op"] == "status" and answer["pool"] == "web"


def test_add_and_remove_change_the_running_worker_count(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, workers=2) as (sup, _server):
        wait_until(lambda: len(sup.pids()) == 2, what="two workers")
        answer = request("web", "add", n=2, directory=ctl_dir)
        assert answer["message"] == "pool 'web': workers 2 → 4 (fixed)"
        assert answer["changes"] == {"workers": [2, 4]} and answer["policy"]["workers"] == 4
        wait_until(lambda: fetch_status("web", directory=ctl_dir)["totals"]["idle"] == 4, what="four idle workers")
        assert len(sup.pids()) == 4
        answer = request("web", "remove", n=3, directory=ctl_dir)
        assert answer["message"] == "pool 'web': workers 4 → 1 (fixed)"
        wait_until(lambda: len(sup.pids()) == 1 and fetch_status("web", directory=ctl_dir)["totals"]["workers"] == 1,
                   what="one worker left")
        # the fixed policy keeps one worker: removing it changes nothing, and says so
        answer = request("web", "remove", n=1, directory=ctl_dir)
        assert answer["message"] == "pool 'web': nothing changed (fixed policy: already at its bound)"
        assert answer["changes"] == {}


def test_add_on_the_spare_policy_moves_both_spare_bounds(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, **{"scaling.name": "spare", "scaling.start_servers": 1, "scaling.min_spare": 1,
                                   "scaling.max_spare": 2, "scaling.max_servers": 6, "scaling.tick": 0.05}) as (_sup, _):
        answer = request("web", "add", n=2, directory=ctl_dir)
        assert answer["message"] == "pool 'web': min_spare 1 → 3, max_spare 2 → 4 (spare)"
        wait_until(lambda: fetch_status("web", directory=ctl_dir)["totals"]["idle"] >= 3, what="three spare workers")


def test_reload_replaces_every_worker_pid(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, workers=3) as (sup, _server):
        before = set(wait_until(lambda: len(p := sup.pids()) == 3 and p, what="three workers"))
        answer = request("web", "reload", directory=ctl_dir)
        assert answer["message"] == "pool 'web': reload: 3 workers will be replaced once idle" and answer["workers"] == 3
        after = wait_until(lambda: len(p := set(sup.pids())) == 3 and not p & before and p, what="three new workers")
        assert not after & before
        status = wait_until(lambda: (s := fetch_status("web", directory=ctl_dir))["totals"]["idle"] == 3 and s)
        assert status["totals"]["exits"].get("reload") == 3


def test_stop_graceful_lets_a_running_task_finish(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, workers=1) as (sup, _server):
        running = sup.submit(napping, (1.0,))
        queued = sup.submit(napping, (0.1,))
        wait_until(lambda: fetch_status("web", directory=ctl_dir)["totals"]["busy"] == 1, what="a busy worker")
        answer = request("web", "stop", graceful=True, directory=ctl_dir)
        assert answer["message"] == "pool 'web': stopping (graceful: queued and running tasks finish)"
        assert running.result(10) == 1.0 and queued.result(10) == 0.1
        assert sup.join(10)
        assert fetch_status("web", directory=ctl_dir)["state"] == "stopped"  # still answering until closed


def test_stop_cancels_the_queue_and_kills_a_running_task_after_kill_grace(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, workers=1, **{"pool.kill_grace": 0.3}) as (sup, _server):
        running = sup.submit(napping, (30.0,))
        queued = [sup.submit(napping, (0.1,)) for _ in range(2)]
        wait_until(lambda: fetch_status("web", directory=ctl_dir)["totals"]["busy"] == 1, what="a busy worker")
        began = time.monotonic()
        answer = request("web", "stop", directory=ctl_dir)
        assert answer["message"] == (
            "pool 'web': stopping: 2 queued tasks cancelled; 1 running task has 0.3 s (pool.kill_grace) "
            "to finish, then its worker is killed"
        )
        assert answer["cancelled"] == 2 and answer["kill_grace"] == 0.3
        for f in queued:
            with pytest.raises(CancelledError):
                f.result(10)
        assert isinstance(running.exception(10), Exception)  # killed: it never returns its 30 s
        assert sup.join(10)
        assert time.monotonic() - began < 10


def test_a_stopping_pool_refuses_changes_and_a_stopped_one_refuses_stop(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, workers=1) as (sup, _server):
        running = sup.submit(napping, (0.5,))
        wait_until(lambda: sup.status()["totals"]["busy"] == 1, what="a busy worker")
        request("web", "stop", graceful=True, directory=ctl_dir)
        wait_until(lambda: sup.closing, what="the pool closing")
        for op, fields in (("add", {"n": 1}), ("remove", {"n": 1}), ("reload", {})):
            if not sup.stopped:
                with pytest.raises(ConfigError, match=r"^pool 'web': the pool (is stopping; it takes no changes|has stopped)$"):
                    request("web", op, directory=ctl_dir, **fields)
        running.result(10)
        assert sup.join(10)
        with pytest.raises(ConfigError, match=r"^pool 'web': the pool has stopped already$"):
            request("web", "stop", directory=ctl_dir)


# -- the protocol: every bad request gets one clear answer, and the server goes on -----------


BAD_REQUESTS = [
    (b"hello\n", "the request is not JSON: Expecting value at column 1"),
    (b"\xff\xfe\x00garbage\n", "the request is not UTF-8 text (byte 0)"),
    (b"[1, 2]\n", "the request must be a JSON object, got list"),
    (b'{"op": "status"}\n', 'the request has no protocol version "v" (this pool speaks 1)'),
    (b'{"v": 2, "op": "status"}\n', "protocol version 2 is not supported (this pool speaks 1)"),
    (b'{"v": true, "op": "status"}\n', "protocol version true is not supported (this pool speaks 1)"),
    (b'{"v": 1.0, "op": "status"}\n', "protocol version 1.0 is not supported (this pool speaks 1)"),
    (b'{"v": 1}\n', 'the request names no "op" (one of add, reload, remove, status, stop, upgrade)'),
    (b'{"v": 1, "op": "destroy"}\n', "unknown op 'destroy' (ops: add, reload, remove, status, stop, upgrade)"),
    (b'{"v": 1, "op": "status", "verbose": 1}\n', "op 'status' takes no fields; got 'verbose'"),
    (b'{"v": 1, "op": "add"}\n', "op 'add' needs n, the number of workers"),
    (b'{"v": 1, "op": "add", "n": 0}\n', "add: n must be a whole number >= 1, got 0"),
    (b'{"v": 1, "op": "remove", "n": "2"}\n', 'remove: n must be a whole number >= 1, got "2"'),
    (b'{"v": 1, "op": "add", "n": true}\n', "add: n must be a whole number >= 1, got true"),
    (b'{"v": 1, "op": "add", "n": 1, "m": 2}\n', "op 'add' takes only n; got 'm'"),
    (b'{"v": 1, "op": "stop", "graceful": "yes"}\n', 'stop: graceful must be true or false, got "yes"'),
    (b'{"v": 1, "op": "status"}\n{"v": 1, "op": "stop"}\n', "one request per connection: 23 more bytes came after the request line"),
    (b"[" * 60000 + b"\n", "the request is not JSON: nested too deeply"),
]


def test_every_bad_request_gets_one_clear_error_and_the_server_keeps_serving(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, workers=1) as (sup, server):
        assert server.path is not None
        for payload, error in BAD_REQUESTS:
            assert answer_of(server.path, payload) == {"v": 1, "ok": False, "error": error}, payload[:60]
        assert not sup.closing  # the 'stop' after a status line was not run
        assert fetch_status("web", directory=ctl_dir)["state"] == "running"
        # a request ended by the end of stream, not a newline, is answered too
        assert answer_of(server.path, b'{"v": 1, "op": "status"}', half_close=True)["ok"] is True
        assert answer_of(server.path, b'{"v": 1, "op": "status"}\r\n')["ok"] is True


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_parsing_any_bytes_either_succeeds_or_says_what_is_wrong(line: bytes) -> None:
    try:
        op, fields = _parse_request(line)
    except _BadRequest as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert op in ("add", "reload", "remove", "status", "stop") and isinstance(fields, dict)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=1, max_size=300).filter(lambda b: b.strip() != b""))
def test_any_bytes_over_the_socket_get_one_answer_line(tmp_path_factory: pytest.TempPathFactory, payload: bytes) -> None:
    global _shared_server  # one pool for every example: forking one per example would be slow
    if _shared_server is None:
        directory = tmp_path_factory.mktemp("hyp") / "ctl"
        _shared_server = ControlServer(_FakePool("hyp"), "hyp", directory=directory).start()
    assert _shared_server.path is not None
    line = raw_exchange(_shared_server.path, payload, half_close=True)
    answer = json.loads(line)
    assert answer["v"] == 1 and isinstance(answer["ok"], bool)
    if not answer["ok"]:
        assert answer["error"] and "\n" not in answer["error"]


_shared_server: ControlServer | None = None


@pytest.fixture(autouse=True, scope="module")
def _close_shared_server() -> Iterator[None]:
    yield
    if _shared_server is not None:
        _shared_server.close()


# -- hostile clients ------------------------------------------------------------------------------


def test_a_10_mb_line_is_refused_and_status_still_answers_within_a_second(ctl_dir: Path) -> None:
    with running_pool(ctl_dir) as (_sup, server):
        assert server.path is not None
        answers: list[bytes] = []
        flood = threading.Thread(target=lambda: answers.append(raw_exchange(server.path, b"x" * (10 * 2**20) + b"\n")))  # type: ignore[arg-type]
        flood.start()
        assert timed_status("web", ctl_dir) < 1.0
        flood.join(20)
        assert not flood.is_alive()
        assert json.loads(answers[0]) == {"v": 1, "ok": False, "error": f"request too long: more than {MAX_REQUEST} bytes without a newline"}
        assert timed_status("web", ctl_dir) < 1.0


def test_a_client_that_sends_no_newline_and_then_nothing_is_timed_out(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, timeout=0.5) as (_sup, server):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.settimeout(10)
            silent.connect(str(server.path))
            silent.sendall(b'{"v": 1, "op": "sta')
            began = time.monotonic()
            assert timed_status("web", ctl_dir) < 1.0  # the silent one blocks nobody
            line = read_line(silent)
            waited = time.monotonic() - began
        assert json.loads(line) == {"v": 1, "ok": False, "error": "no complete request line within 0.5 s"}
        assert 0.2 < waited < 5.0


def test_200_concurrent_connections_do_not_stop_status_from_answering(ctl_dir: Path) -> None:
    with running_pool(ctl_dir) as (_sup, server):
        hostile: list[socket.socket] = []
        try:
            for i in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                hostile.append(s)
                s.connect(str(server.path))  # blocking: waits while the server's backlog is full
                s.settimeout(5)
                if i % 3 == 0:
                    s.sendall(b'{"v": 1, ')  # half a request, then nothing
                elif i % 3 == 1:
                    s.sendall(bytes(range(256)) * 4)  # binary garbage, no newline
            assert timed_status("web", ctl_dir) < 1.0
            # the oldest were dropped to keep at most MAX_CLIENTS, each told why
            dropped = json.loads(read_line(hostile[0]))
            assert dropped == {"v": 1, "ok": False, "error": "too many connections: this one was the oldest"}
        finally:
            for s in hostile:
                s.close()
        assert timed_status("web", ctl_dir) < 1.0


def test_a_client_that_does_not_read_its_answer_blocks_nobody(ctl_dir: Path) -> None:
    with running_pool(ctl_dir) as (_sup, server), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lazy:
        lazy.connect(str(server.path))
        lazy.sendall(b'{"v": 1, "op": "status"}\n')  # and never reads the answer
        assert timed_status("web", ctl_dir) < 1.0


# -- who may connect -------------------------------------------------------------------------------


def _as_nobody(job: Callable[[], str]) -> str:
    """Run ``job`` in a forked child as uid/gid 65534; what it returned (or raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls and a few pure functions
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = job()
            except BaseException as exc:
                out = f"{type(exc).__name__}: {exc}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    end = time.monotonic() + 20
    while time.monotonic() < end:
        ready, _, _ = select.select([r], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            break
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run a client as another uid (os.setuid)")


@needs_root
def test_a_connection_from_another_uid_is_refused_by_its_peer_credentials(tmp_path: Path) -> None:
    # make the socket reachable by everyone, as a careless chmod would: the peer check still refuses
    base = Path(os.path.realpath("/tmp")) / f"prefork-test-{os.getpid()}-{tmp_path.name}"
    base.mkdir(mode=0o711)
    try:
        os.chmod(base, 0o711)
        with running_pool(base / "ctl", name="guarded", workers=1) as (sup, server):
            assert server.path is not None
            os.chmod(base / "ctl", 0o711)
            os.chmod(server.path, 0o666)
            path = str(server.path)

            def stop_it() -> str:
                return raw_exchange(Path(path), b'{"v": 1, "op": "stop"}\n').decode()

            answer = json.loads(_as_nobody(stop_it))
            assert answer == {
                "v": 1, "ok": False,
                "error": f"refused: uid {NOBODY} may not control this pool (only its owner, uid 0, and root)",
            }
            assert not sup.closing and fetch_status("guarded", directory=base / "ctl")["state"] == "running"
    finally:
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        base.rmdir()


@needs_root
def test_another_user_with_the_default_modes_gets_one_clear_line(tmp_path: Path) -> None:
    base = Path("/tmp") / f"prefork-test-{os.getpid()}-{tmp_path.name}"
    base.mkdir(mode=0o711)
    try:
        os.chmod(base, 0o711)
        with running_pool(base / "ctl", name="private", workers=1):
            directory = base / "ctl"

            def ask() -> str:
                return json.dumps(request("private", "status", directory=directory))

            said = _as_nobody(ask)
        assert said == (
            f"ConfigError: control directory {directory} belongs to uid 0, not to you (uid {NOBODY}); remove or fix "
            "it (it must be a directory of yours that no one else may write, mode 0700)"
        )
    finally:
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        base.rmdir()


# -- one name, one live pool; no socket left behind ------------------------------------------------


POOL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from prefork._supervisor import Supervisor
    from prefork.config import load_config
    from prefork.control import ControlServer
    sup = Supervisor(load_config(None, {"name": "web", "scaling.name": "fixed", "scaling.workers": 1}))
    sup.start()
    server = ControlServer(sup, "web", directory=sys.argv[1]).start()
    if sys.argv[2] == "orphan":  # a child that keeps the listening socket after we die
        child = os.fork()
        if child == 0:
            import time
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def _start_pool_process(directory: Path, mode: str = "plain") -> tuple[subprocess.Popen[str], int | None]:
    proc = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT, str(directory), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    orphan = int(proc.stdout.readline()) if mode == "orphan" else None
    assert proc.stdout.readline().strip() == "ready"
    return proc, orphan


def _kill9(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.stdout.close()


def test_a_live_pool_of_the_same_name_is_refused_naming_its_pid_and_a_sigkilled_ones_socket_is_replaced(ctl_dir: Path) -> None:
    proc, _ = _start_pool_process(ctl_dir)
    try:
        assert [(p.name, p.pid) for p in list_pools(ctl_dir)] == [("web", proc.pid)]
        sup = Supervisor(load_config(None, {"name": "web", "scaling.name": "fixed", "scaling.workers": 1}))
        with pytest.raises(ConfigError) as err:
            ControlServer(sup, "web", directory=ctl_dir).start()
        assert str(err.value) == (
            f"pool name 'web' is taken: process {proc.pid} runs a pool of that name (control socket "
            f"{ctl_dir / 'web.sock'}); stop it (prefork ctl web stop) or give this pool another name"
        )
        assert fetch_status("web", directory=ctl_dir)["pid"] == proc.pid  # the refused start touched nothing
    finally:
        _kill9(proc)
    # SIGKILL: no teardown ran, the socket file stays and refuses connections
    assert os.listdir(ctl_dir) == ["web.sock"]
    assert list_pools(ctl_dir) == []
    with pytest.raises(ConfigError, match=r"^pool 'web' is not running: its control socket .* is stale"):
        request("web", "status", directory=ctl_dir)
    with pytest.raises(ConfigError, match=r"^no pool is running \(no live control socket in .*\); 1 stale socket"):
        _raise_cli_error("status", "--socket-dir", str(ctl_dir))
    with running_pool(ctl_dir) as (_sup, server):
        assert fetch_status("web", directory=ctl_dir)["pid"] == os.getpid()
        assert os.listdir(ctl_dir) == ["web.sock"] and server.path is not None


def test_a_socket_held_by_an_orphan_of_a_dead_pool_is_replaced(ctl_dir: Path) -> None:
    proc, orphan = _start_pool_process(ctl_dir, "orphan")
    assert orphan is not None
    try:
        _kill9(proc)
        assert pid_alive(orphan)  # it holds the listening socket: connections succeed, nobody answers
        with running_pool(ctl_dir) as _:
            assert fetch_status("web", directory=ctl_dir)["pid"] == os.getpid()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
        wait_until(lambda: not pid_alive(orphan), what="the orphan gone")


def test_close_in_a_forked_child_removes_nothing(ctl_dir: Path) -> None:
    with running_pool(ctl_dir) as (_sup, server):
        pid = os.fork()
        if pid == 0:
            try:
                server.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.listdir(ctl_dir) == ["web.sock"]
        assert timed_status("web", ctl_dir) < 1.0


def test_close_does_not_remove_a_socket_that_another_server_put_there(ctl_dir: Path) -> None:
    first = ControlServer(_FakePool("web"), "web", directory=ctl_dir).start()
    assert first.path is not None
    os.unlink(first.path)  # someone removed it, and another pool took the name
    second = ControlServer(_FakePool("web"), "web", directory=ctl_dir).start()
    try:
        first.close()
        assert os.listdir(ctl_dir) == ["web.sock"]
        assert fetch_status("web", directory=ctl_dir)["name"] == "web"
    finally:
        second.close()
    assert os.listdir(ctl_dir) == []


class _FakePool:
    """A pool as the Protocol sees it, for the server's own life cycle (no processes)."""

    def __init__(self, name: str, on_shutdown: Callable[[], None] | None = None) -> None:
        self.config = load_config(None, {"name": name})
        self.stopped = False
        self.closing = False
        self.broken: BaseException | None = None
        self.on_shutdown = on_shutdown
        self.shutdowns: list[dict[str, bool]] = []

    def status(self) -> dict[str, Any]:
        return {"version": 1, "name": self.config.name, "state": "stopped" if self.stopped else "running",
                "policy": {"name": "fixed", "workers": 1, "max_workers": 1}, "workers": [],
                "totals": {"queued": 0, "busy": 0}}

    def resize(self, delta: int) -> object:
        raise TypeError("scaling policy 'custom' cannot be resized (it has no resized(delta) method)")

    def retire_all(self, reason: str) -> None:
        pass

    def shutdown(self, wait: bool = True, cancel_futures: bool = False, force: bool = False) -> None:
        self.shutdowns.append({"wait": wait, "cancel_futures": cancel_futures, "force": force})
        self.closing = True
        if self.on_shutdown is not None:
            self.on_shutdown()


def test_a_pool_whose_teardown_closes_the_server_from_its_own_thread_does_not_hang(ctl_dir: Path) -> None:
    # as a Supervisor never started does: shutdown() tears down at once, in the calling thread
    server: list[ControlServer] = []
    pool = _FakePool("web", on_shutdown=lambda: server[0].close())
    server.append(ControlServer(pool, "web", directory=ctl_dir).start())
    answer = request("web", "stop", graceful=True, directory=ctl_dir)
    assert answer["message"] == "pool 'web': stopping (graceful: queued and running tasks finish)"
    wait_until(lambda: os.listdir(ctl_dir) == [], what="the socket removed")
    assert pool.shutdowns == [{"wait": False, "cancel_futures": False, "force": False}]


def test_a_policy_that_cannot_be_resized_says_so(ctl_dir: Path) -> None:
    with ControlServer(_FakePool("web"), "web", directory=ctl_dir), pytest.raises(ConfigError) as err:
        request("web", "add", n=1, directory=ctl_dir)
    assert str(err.value) == "pool 'web': scaling policy 'custom' cannot be resized (it has no resized(delta) method)"


def test_a_forced_stop_with_no_grace_kills_at_once(ctl_dir: Path) -> None:
    pool = _FakePool("web")
    pool.config = SimpleNamespace(name="web", pool=SimpleNamespace(kill_grace=0.0))  # a Config allows no 0
    with ControlServer(pool, "web", directory=ctl_dir):
        request("web", "stop", directory=ctl_dir)
        wait_until(lambda: len(pool.shutdowns) == 2, what="two shutdown calls")
    assert pool.shutdowns == [{"wait": False, "cancel_futures": True, "force": False},
                              {"wait": False, "cancel_futures": False, "force": True}]


# -- the client's errors ---------------------------------------------------------------------------


def test_asking_a_pool_that_is_not_there_says_which_are(ctl_dir: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^no pool named 'web' is running \(no control directory {ctl_dir}\)$"):
        request("web", "status", directory=ctl_dir)
    with running_pool(ctl_dir, name="api", workers=1):
        with pytest.raises(ConfigError) as err:
            request("web", "status", directory=ctl_dir)
        assert str(err.value) == f"no pool named 'web' is running (no control socket {ctl_dir / 'web.sock'}); running: api"


def test_list_pools_skips_stale_sockets_and_other_files(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, name="api", workers=1):
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(ctl_dir / "dead.sock"))
        dead.close()  # bound, never listened: connections are refused
        (ctl_dir / "notes.txt").write_text("x")
        (ctl_dir / ".tmp-1-ab").write_text("x")
        assert [(p.name, p.pid) for p in list_pools(ctl_dir)] == [("api", os.getpid())]
    assert list_pools(ctl_dir / "missing") == []


# -- prefork status / prefork ctl ------------------------------------------------------------------


def _raise_cli_error(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="prefork")
    sub = parser.add_subparsers(dest="command", required=True)
    add_status_parser(sub)
    add_ctl_parser(sub)
    args = parser.parse_args(list(argv))
    args.func(args)


def test_status_without_a_name_shows_the_only_pool_and_asks_for_one_among_several(
    ctl_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=rf"^no pool is running \(no live control socket in {ctl_dir}\)$"):
        _raise_cli_error("status", "--socket-dir", str(ctl_dir))
    with running_pool(ctl_dir, name="api", workers=1):
        assert cli("status", "--socket-dir", str(ctl_dir)) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"pool 'api' (executor), pid {os.getpid()}: running, up ")
        with running_pool(ctl_dir, name="web", workers=1):
            assert cli("status", "--socket-dir", str(ctl_dir)) == 2
            err = capsys.readouterr().err
            assert err == f"prefork: error: 2 pools are running: api (pid {os.getpid()}), web (pid {os.getpid()}); name one: prefork status NAME\n"
            assert cli("status", "web", "--socket-dir", str(ctl_dir), "--json") == 0
            printed = json.loads(capsys.readouterr().out)
            assert printed["name"] == "web" and printed["version"] == 1


def test_ctl_prints_what_happened(ctl_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_pool(ctl_dir, workers=2) as (sup, _server):
        assert cli("ctl", "web", "add", "1", "--socket-dir", str(ctl_dir)) == 0
        assert capsys.readouterr().out == "pool 'web': workers 2 → 3 (fixed)\n"
        assert cli("ctl", "--socket-dir", str(ctl_dir), "web", "remove", "2") == 0
        assert capsys.readouterr().out == "pool 'web': workers 3 → 1 (fixed)\n"
        assert cli("ctl", "nope", "reload", "--socket-dir", str(ctl_dir)) == 2
        assert capsys.readouterr().err == (
            f"prefork: error: no pool named 'nope' is running (no control socket {ctl_dir / 'nope.sock'}); running: web\n"
        )
        assert cli("ctl", "web", "stop", "--graceful", "--socket-dir", str(ctl_dir)) == 0
        assert capsys.readouterr().out == "pool 'web': stopping (graceful: queued and running tasks finish)\n"
        assert sup.join(10)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ctl", "web", "add", "0"], "argument N: '0': must be 1 or more"),
        (["ctl", "web", "remove", "two"], "argument N: 'two' is not a whole number"),
        (["ctl", "web"], "the following arguments are required: ACTION"),
        (["ctl", "web", "restart"], "argument ACTION: invalid choice: 'restart'"),
        (["status", "--interval", "0"], "argument --interval: '0': must be at least 0.1 seconds"),
        (["status", "--interval", "nan"], "argument --interval: 'nan': must be at least 0.1 seconds"),
    ],
)
def test_bad_command_lines_are_refused_by_argparse(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(*argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_watch_redraws_in_place_and_ends_on_ctrl_c_or_when_the_pool_goes() -> None:
    snapshots = iter([{"name": "a", "version": 1}, {"name": "b", "version": 1}])
    out = io.StringIO()
    assert watch(lambda: next(snapshots), out, 0.5, width=lambda: 80, sleep=lambda s: None, frames=2) == 0
    frames = out.getvalue().split(CLEAR)
    assert frames[0] == "" and len(frames) == 3
    assert frames[1].startswith("pool 'a' ") and frames[2].startswith("pool 'b' ")
    assert "every 0.5 s; Ctrl-C to quit" in frames[2]

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    out = io.StringIO()
    assert watch(lambda: {"name": "a"}, out, 1.0, width=lambda: 80, sleep=interrupted) == 0
    calls = iter([{"name": "a"}])

    def gone() -> Mapping[str, Any]:
        for snapshot in calls:
            return snapshot
        raise ConfigError("no pool named 'a' is running")

    assert watch(gone, io.StringIO(), 1.0, width=lambda: 80, sleep=lambda s: None) == 1
    with pytest.raises(ConfigError):  # gone before the first frame: the usual error
        watch(gone, io.StringIO(), 1.0, sleep=lambda s: None)

    json_out = io.StringIO()
    snapshots = iter([{"name": "a"}, {"name": "b"}])
    assert watch(lambda: next(snapshots), json_out, 1.0, as_json=True, sleep=lambda s: None, frames=2) == 0
    assert [json.loads(line)["name"] for line in json_out.getvalue().splitlines()] == ["a", "b"]


WATCH_SCRIPT = "import sys; from prefork.cli import main; sys.exit(main(sys.argv[1:]))"


def test_status_watch_in_a_real_process_exits_0_on_ctrl_c(ctl_dir: Path) -> None:
    with running_pool(ctl_dir, workers=1):
        frames, seen = run_watch(["status", "--watch", "--interval", "0.1", "--socket-dir", str(ctl_dir)], frames=3)
    assert frames >= 3 and b"pool 'web' (executor)" in seen


# -- render_status ----------------------------------------------------------------------------------


def _snapshot(workers: list[dict[str, Any]], **totals: Any) -> dict[str, Any]:
    return {
        "version": 1, "name": "web", "profile": "executor", "pid": 4242, "uptime": 192.5, "started": 0.0,
        "state": "running", "policy": {"name": "fixed", "workers": len(workers), "max_workers": len(workers)},
        "workers": workers,
        "totals": {"workers": len(workers), "booting": 0, "idle": 1, "busy": 1, "stopping": 0, "queued": 12,
                   "in_flight": 1, "submitted": 1250, "completed": 1234,
                   "failed": {"error": 2, "crash": 1, "timeout": 0, "cancelled": 0, "shutdown": 0},
                   "exits": {"crash": 1, "max-tasks": 4}, "spawned": 7, **totals},
    }


def _worker(pid: int, state: str, method: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"slot": 0, "pid": pid, "state": state, "served": 301, "age": 3723.0, "rss": 47_400_000,
            "task": 812 if method else None, "method": method, "running_for": 1.25 if method else None, **fields}


def test_render_status_shows_every_column_and_the_totals() -> None:
    text = render_status(_snapshot([_worker(12345, "busy", "examples.primes:count"), _worker(12346, "idle")]), 100)
    lines = text.splitlines()
    assert lines[:6] == [
        "pool 'web' (executor), pid 4242: running, up 3m12s",
        "policy fixed: workers=2; at most 2 workers",
        "workers: 2 (1 busy, 1 idle, 0 booting), 0 stopping; 7 forked since start",
        "tasks: 12 queued, 1 in flight, 1234 completed of 1250 submitted",
        "failed: 2 error, 1 crash, 0 timeout, 0 cancelled, 0 shutdown",
        "worker exits: 1 crash, 4 max-tasks",
    ]
    assert lines[7].split() == ["PID", "STATE", "TASK", "RUNNING", "SERVED", "RSS", "MiB", "AGE", "METHOD"]
    assert lines[8].split() == ["12345", "busy", "812", "1.2s", "301", "45.2", "1h02m", "examples.primes:count"]
    assert lines[9].split() == ["12346", "idle", "-", "-", "301", "45.2", "1h02m", "-"]
    # numbers are right-aligned under their header
    assert lines[8].index("812") + 3 == lines[7].index("TASK") + 4


def test_a_long_method_name_is_cut_at_its_start_to_the_width() -> None:
    method = "a.very.long.package.name.with.many.parts:SomeClass.some_method_name"
    for width in (60, 80, 100):
        text = render_status(_snapshot([_worker(1, "busy", method)]), width)
        row = text.splitlines()[-1]
        assert len(row) <= width and row.endswith("some_method_name") and "…" in row
    assert render_status(_snapshot([_worker(1, "busy", method)]), 200).splitlines()[-1].endswith(" " + method)


def test_a_narrow_terminal_drops_the_least_telling_columns_first() -> None:
    text = render_status(_snapshot([_worker(1, "busy", "mod:func")]), 50)
    header = text.splitlines()[-2]
    assert "RSS MiB" not in header and "SERVED" not in header
    assert header.split()[:3] == ["PID", "STATE", "TASK"] and header.endswith("METHOD")
    assert all(len(line) <= 50 for line in text.splitlines())


def test_render_status_of_a_stopped_pool_and_of_leaving_workers() -> None:
    assert render_status({**_snapshot([]), "state": "stopped"}, 80).splitlines()[-1] == "(no workers)"
    text = render_status(_snapshot([_worker(7, "stopping", leaving="reload")]), 80)
    assert text.splitlines()[-1].endswith("(leaving: reload)")
    assert render_status({**_snapshot([]), "version": 2}, 80).startswith("(status version 2; this prefork reads version 1")


def test_control_characters_from_a_method_name_reach_no_terminal() -> None:
    text = render_status(_snapshot([_worker(1, "busy", "evil:\x1b[2J\x1b]0;owned\x07name")]), 120)
    assert "\x1b" not in text and "\x07" not in text and "evil:?[2J?]0;owned?name" in text


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 0, 0.04, 9.96, 12.7, 185, 7380, 3 * 86400 + 7200, float("nan"))] == [
        "-", "0.0s", "0.0s", "10.0s", "12s", "3m05s", "2h03m", "3d02h", "-",
    ]


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=120)
workers_st = st.lists(
    st.fixed_dictionaries({
        "pid": st.integers(1, 4_194_304), "state": st.sampled_from(["booting", "idle", "busy", "stopping"]),
        "task": st.none() | st.integers(0, 10**12), "method": st.none() | names,
        "running_for": st.none() | st.floats(0, 10**7), "served": st.integers(0, 10**9),
        "rss": st.none() | st.integers(0, 2**40), "age": st.floats(0, 10**8), "leaving": st.none() | names,
    }),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(workers=workers_st, width=st.integers(20, 240), name=names)
def test_every_line_fits_the_width_and_carries_no_control_character(workers: list[dict[str, Any]], width: int, name: str) -> None:
    text = render_status({**_snapshot(workers), "name": name}, width)
    assert text.endswith("\n")
    for line in text.splitlines():
        assert sum(2 if _wide(ch) else 1 for ch in line) <= width, line
        assert line.isprintable(), line


def _wide(ch: str) -> bool:
    import unicodedata

    return unicodedata.east_asian_width(ch) in ("W", "F")


# -- docs/control.md: every snippet runs ----------------------------------------------------------


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


def _commands(body: str) -> list[tuple[list[str], list[str]]]:
    """The ``$ prefork ...`` lines of a console block, each with the lines shown after it."""
    out: list[tuple[list[str], list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:].split(), []))
        else:
            out[-1][1].append(line)
    return out


def test_the_docs_samples_are_a_real_snapshots_shape_and_render_as_the_docs_show() -> None:
    blocks = _blocks(DOC.read_text())
    sample = next(json.loads(body) for lang, body in blocks if lang == "json")
    shown = next(shown for lang, body in blocks if lang == "console"
                 for argv, shown in _commands(body) if argv == ["prefork", "status", "web"])
    assert render_status(sample, 80) == "\n".join(shown) + "\n"
    sup = Supervisor(load_config(None, {"name": "web", "scaling.name": "fixed", "scaling.workers": 1}))
    sup.start()
    try:
        real = wait_until(lambda: (s := sup.status())["totals"]["idle"] == 1 and s, what="an idle worker")
    finally:
        sup.shutdown()

    def shape(value: Any, key: str = "") -> Any:
        if key == "exits":  # keys only for causes seen so far
            return "counts"
        if isinstance(value, dict):
            return {k: shape(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(value[0])] if value else []
        return None

    assert shape(sample) == shape(real)


def run_watch(argv: list[str], frames: int = 2) -> tuple[int, bytes]:
    """``prefork status ... --watch`` in its own process, interrupted by SIGINT after ``frames`` frames."""
    proc = subprocess.Popen([sys.executable, "-c", WATCH_SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    seen = b""
    end = time.monotonic() + 20
    while seen.count(CLEAR.encode()) < frames and time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if ready:
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            seen += data
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return seen.count(CLEAR.encode()), seen


def test_every_command_in_the_docs_runs_and_says_what_the_docs_say(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the default directory, as a user has it
    ctl_dir = tmp_path / "prefork"
    pools: list[tuple[Supervisor, ControlServer]] = []

    def ensure_pool() -> Supervisor:
        if pools and not pools[-1][0].stopped:
            return pools[-1][0]
        if pools:
            pools[-1][1].close()  # as the pool's teardown will
        sup = Supervisor(load_config(None, {"name": "web", "scaling.name": "fixed", "scaling.workers": 2,
                                            "pool.kill_grace": 0.2}))
        sup.start()
        pools.append((sup, ControlServer(sup, "web").start()))
        wait_until(lambda: len(sup.pids()) == 2, what="two workers")
        return sup

    def masked(text: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "#", text)

    ran = []
    try:
        for lang, body in _blocks(DOC.read_text()):
            if lang == "console":
                for argv, shown in _commands(body):
                    assert argv[0] == "prefork", argv
                    sup = ensure_pool()
                    if "--watch" in argv:
                        frames, seen = run_watch(argv[1:])
                        assert frames >= 2 and b"pool 'web' (executor)" in seen
                    else:
                        assert cli(*argv[1:]) == 0, argv
                        out = capsys.readouterr().out
                        if argv[1] == "ctl":
                            assert masked(out.rstrip("\n")) == masked("\n".join(shown)), argv
                        elif "--json" in argv:
                            assert json.loads(out)["name"] == "web"
                        else:
                            assert out.startswith("pool 'web' (executor), pid ")
                    if argv[1:2] == ["ctl"] and argv[3] == "stop":
                        assert sup.join(10)
                    ran.append(argv)
            elif lang == "python":
                ensure_pool()
                exec(compile(body, str(DOC), "exec"), {"__name__": "docs_control"})
                out = capsys.readouterr().out
                ran.append(["python"])
    finally:
        for sup, server in pools:
            server.close()
            sup.shutdown(wait=True, cancel_futures=True, force=True)
    assert sum(1 for argv in ran if argv[0] == "prefork") == 9 and ran.count(["python"]) == 2
    assert os.listdir(ctl_dir) == []
