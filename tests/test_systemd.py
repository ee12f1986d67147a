"""systemd's protocols as prefork speaks them (prefork/_systemd.py), with real sockets:
a fake NOTIFY_SOCKET (a path and an abstract name) that checks every message and who
sent it, listening sockets passed at fd 3 to a process whose LISTEN_PID is its own
(as systemd does, through a launcher that execs), the example units (parsed, and
checked by systemd-analyze when present), the docs' snippets, and ``prefork serve``
end to end under a fake systemd: socket activation, READY / RELOADING / STOPPING,
the watchdog, a restart that refuses nobody, and systemd's own systemd-socket-activate."""

from __future__ import annotations

import configparser
import contextlib
import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork import _systemd
from prefork._systemd import Announcer, Seen, _parse_listen_env, _same_place
from prefork.cli import build_parser
from prefork.cli import main as cli_main
from prefork.config import load_config
from prefork.errors import ConfigError
from prefork.testing import descendants, pid_alive, reaped, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: the "### systemd" section
SECTION_FILES = (ROOT / "docs" / "profiles" / "mpm.md",)


def section() -> str:
    for path in SECTION_FILES:
        text = path.read_text()
        if "<!-- systemd: service -->" in text:
            return text
    raise AssertionError(f"no '### systemd' section in {', '.join(str(p) for p in SECTION_FILES)}")


def block(mark: str) -> str:
    [found] = re.findall(rf"<!-- systemd: {mark} -->\n```\w*\n(.*?)```", section(), re.S)
    return str(found)


# -- a fake systemd: the notify socket --------------------------------------------------------------


class Receiver:
    """A NOTIFY_SOCKET: each datagram, with the pid that sent it (SO_PASSCRED, as systemd reads it)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.seen: list[tuple[str, int]] = []

    def next(self, timeout: float = 20.0) -> tuple[str, int]:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no notification in {timeout} s; so far: {self.seen}") from None
        pid = -1
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = struct.unpack("3i", payload[:12])[0]
        self.seen.append((data.decode(), pid))
        return data.decode(), pid

    def until(self, first_line: str, timeout: float = 20.0) -> tuple[str, list[str]]:
        """The next message whose first line is ``first_line``, and the messages before it."""
        end = time.monotonic() + timeout
        before: list[str] = []
        while True:
            text, _ = self.next(max(0.01, end - time.monotonic()))
            if text.split("\n", 1)[0] == first_line:
                return text, before
            before.append(text)

    def pending(self) -> list[str]:
        out = []
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(self.sock.recv(65536).decode())
        return out

    def close(self) -> None:
        self.sock.close()


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n"))


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    r = Receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield r
    r.close()


@pytest.fixture
def abstract_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    name = f"prefork-test-{uuid.uuid4().hex}"
    r = Receiver(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield r
    r.close()


# -- notify -------------------------------------------------------------------------------------------


def test_no_notify_socket_sends_nothing_and_says_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert _systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert _systemd.notify("READY=1") is False


def test_a_path_socket_receives_exactly_what_was_sent_from_this_process(receiver: Receiver) -> None:
    assert _systemd.notify("READY=1\nSTATUS=hello") is True
    assert receiver.next() == ("READY=1\nSTATUS=hello", os.getpid())


def test_an_abstract_socket_receives_each_helper_s_message(abstract_receiver: Receiver) -> None:
    r = abstract_receiver
    assert _systemd.notify(_systemd.ready_message("serving on x")) is True
    assert r.next()[0] == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on x"
    assert _systemd.notify(_systemd.ready_message("", pid=77)) is True
    assert r.next()[0] == "READY=1\nMAINPID=77"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert _systemd.notify(_systemd.reloading_message("reloading")) is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = fields(r.next()[0])
    assert list(got) == ["RELOADING", "MONOTONIC_USEC", "STATUS"]
    assert got["RELOADING"] == "1" and got["STATUS"] == "reloading"
    assert before <= int(got["MONOTONIC_USEC"]) <= after  # CLOCK_MONOTONIC, microseconds
    assert _systemd.notify(_systemd.stopping_message()) is True
    assert r.next()[0] == "STOPPING=1"
    assert _systemd.notify(_systemd.WATCHDOG_MESSAGE) is True
    assert r.next()[0] == "WATCHDOG=1"
    assert _systemd.notify(_systemd.status_message("3 idle")) is True
    assert r.next()[0] == "STATUS=3 idle"


def test_a_status_of_more_than_one_line_is_refused_not_sent(receiver: Receiver) -> None:
    with pytest.raises(ValueError, match="one line"):
        _systemd.status_message("two\nlines")
    with pytest.raises(ValueError, match="one line"):
        _systemd.ready_message("a\rb")
    with pytest.raises(ValueError, match="one line"):
        _systemd.stopping_message("a\nSTOPPING=1")
    assert receiver.pending() == []


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=2000))
def test_any_text_arrives_byte_for_byte(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("n") / "notify"
    r = Receiver(str(path))
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(path)
    try:
        assert _systemd.notify(text) is True
        r.sock.settimeout(5)
        assert r.sock.recv(65536) == text.encode()
    finally:
        r.close()
        if old is None:
            del os.environ["NOTIFY_SOCKET"]
        else:
            os.environ["NOTIFY_SOCKET"] = old


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "prefork.serve" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("where", ["/nonexistent/dir/notify", "relative/notify", "vsock:2:999", "@"])
def test_a_socket_that_cannot_be_reached_warns_once_and_never_raises(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    where = where if where != "@" else f"@prefork-nobody-{uuid.uuid4().hex}"
    if where.startswith("/"):
        where = str(tmp_path / "missing" / uuid.uuid4().hex)
    monkeypatch.setenv("NOTIFY_SOCKET", where)
    caplog.set_level(logging.WARNING, "prefork.serve")
    assert _systemd.notify("READY=1") is False
    assert _systemd.notify("WATCHDOG=1") is False
    assert _systemd.notify("STOPPING=1") is False
    [warning] = warnings_of(caplog)
    assert where in warning and "\n" not in warning


def test_a_receiver_that_never_reads_holds_the_sender_at_most_send_timeout(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_systemd, "SEND_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, "prefork.serve")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.connect(os.environ["NOTIFY_SOCKET"])
        filler.setblocking(False)
        for _ in range(100_000):  # the queue holds net.unix.max_dgram_qlen datagrams (10 by default)
            try:
                filler.send(b"x" * 512)
            except BlockingIOError:
                break
        else:
            pytest.fail("the receiver's queue never filled")
    start = time.monotonic()
    assert _systemd.notify("WATCHDOG=1") is False
    assert _systemd.notify("WATCHDOG=1") is False
    assert time.monotonic() - start < 2.0
    [warning] = warnings_of(caplog)
    assert "WATCHDOG=1" in warning and "timed out" in warning
    receiver.pending()  # drained: the next one goes through
    assert _systemd.notify("READY=1") is True
    assert receiver.next()[0] == "READY=1"


def test_an_unencodable_message_is_not_sent_and_warns(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "prefork.serve")
    assert _systemd.notify("STATUS=\udcff") is False
    assert len(warnings_of(caplog)) == 1
    assert receiver.pending() == []


# -- watchdog_interval --------------------------------------------------------------------------------


def test_the_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert _systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert _systemd.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert _systemd.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))  # the supervisor, as its forked children see it
    assert _systemd.watchdog_interval() is None
    # an upgrade's new master takes over the watchdog of the master it replaces, for its own successor too
    assert _systemd.watchdog_interval(predecessor=os.getppid()) == 5.0
    assert os.environ["WATCHDOG_PID"] == str(os.getpid())
    assert _systemd.watchdog_interval(predecessor=1) == 5.0  # it is ours now


@pytest.mark.parametrize(("usec", "pid"), [
    ("ten", None), ("-5", None), ("0", None), ("1e6", None), (" 5", None), ("٣", None), ("9" * 400, None),
    ("1000000", "self?"), ("1000000", "0"), ("1000000", "-1"), ("1000000", ""),
])
def test_a_malformed_watchdog_variable_is_refused_in_one_line(
    usec: str, pid: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    with pytest.raises(ConfigError) as err:
        _systemd.watchdog_interval()
    assert "\n" not in str(err.value)
    assert ("WATCHDOG_PID" if pid is not None else "WATCHDOG_USEC") in str(err.value)


# -- the socket-activation variables, parsed ---------------------------------------------------------

PID = 4242
LIMIT = 1024


@pytest.mark.parametrize(("env", "sockets", "names"), [
    ({}, 0, []),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "1"}, 1, ["unknown"]),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}, 2, ["web", "admin"]),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""}, 1, [""]),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": str(LIMIT - 3)}, LIMIT - 3, ["unknown"] * (LIMIT - 3)),
])
def test_well_formed_variables(env: dict[str, str], sockets: int, names: list[str]) -> None:
    got = _parse_listen_env(env, PID, LIMIT)
    assert (got.sockets, got.names, got.note) == (sockets, names, "")


@pytest.mark.parametrize(("env", "says"), [
    ({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, "LISTEN_PID=1 is not this process (pid 4242)"),
    ({"LISTEN_FDS": "1"}, "without LISTEN_PID"),
    ({"LISTEN_PID": "4242"}, "LISTEN_FDS is not set"),
    ({"LISTEN_PID": "1", "LISTEN_FDS": "-1"}, "is not this process"),  # not ours: not even read, as systemd does
])
def test_variables_for_another_process_are_not_used_and_say_why(env: dict[str, str], says: str) -> None:
    got = _parse_listen_env(env, PID, LIMIT)
    assert (got.sockets, got.names) == (0, [])
    assert says in got.note and "\n" not in got.note


@pytest.mark.parametrize(("env", "says"), [
    ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID='abc': not a process id"),
    ({"LISTEN_PID": "-4242", "LISTEN_FDS": "1"}, "LISTEN_PID='-4242'"),
    ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID='0'"),
    ({"LISTEN_PID": "", "LISTEN_FDS": "1"}, "LISTEN_PID=''"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1': not a count"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "0"}, "LISTEN_FDS='0'"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "one"}, "LISTEN_FDS='one'"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "99999999999999999999"}, "too large"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "9" * 5000}, "too large"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": str(LIMIT - 2)}, "RLIMIT_NOFILE = 1024"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"}, "names 1 socket(s), LISTEN_FDS=2"),
    ({"LISTEN_PID": "4242", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, "names 2 socket(s), LISTEN_FDS=1"),
])
def test_malformed_variables_are_refused_in_one_line(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse_listen_env(env, PID, LIMIT)
    assert says in str(err.value) and "\n" not in str(err.value)


_env_value = st.one_of(st.none(), st.text(max_size=30), st.integers(-5, 2000).map(str), st.just("4242"))


@settings(max_examples=500)
@given(_env_value, _env_value, _env_value)
def test_any_variables_give_sockets_for_us_a_reason_or_one_line_refusal(
    pid: str | None, fds: str | None, names: str | None
) -> None:
    env = {k: v for k, v in (("LISTEN_PID", pid), ("LISTEN_FDS", fds), ("LISTEN_FDNAMES", names)) if v is not None}
    try:
        got = _parse_listen_env(env, PID, LIMIT)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(("LISTEN_PID=", "LISTEN_FDS=", "LISTEN_FDNAMES="))
        return
    if got.sockets:
        assert pid == "4242" and fds is not None and int(fds) == got.sockets == len(got.names)
        assert 0 < got.sockets <= LIMIT - 3 and got.note == ""
    else:
        assert got.names == [] and (got.note != "") == bool(env.keys() & {"LISTEN_PID", "LISTEN_FDS"})


# -- listen_fds with real descriptors at fd 3 --------------------------------------------------------

#: what systemd does before it execs the service: the sockets at fd 3, 4, ...; LISTEN_PID
#: set to the pid that execs (this process, which becomes the service: exec keeps the pid)
LAUNCHER = r"""
import fcntl, json, os, sys
spec = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 200) for fd in spec["fds"]]
for fd in spec["fds"]:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # inheritable, as systemd passes them
    os.close(fd)
for key, value in spec["env"].items():
    os.environ[key] = value.replace("$PID", str(os.getpid()))
os.execv(spec["argv"][0], spec["argv"])
"""

PROBE = r"""
import json, os, signal, socket, subprocess, sys
from prefork import _systemd
from prefork.errors import ConfigError
def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
out = {"open_before": [fd for fd in range(3, 10) if is_open(fd)]}
try:
    passed = _systemd.listen_fds_with_names(unset_environment=json.loads(sys.argv[1]))
except ConfigError as exc:
    out["error"] = str(exc)
    passed = []
out["env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
out["sockets"] = [{"name": n, "fd": s.fileno(), "family": s.family.name, "type": s.type.name,
                   "address": _systemd.describe(s), "inheritable": os.get_inheritable(s.fileno()),
                   "backlog": None} for n, s in passed]
child = 0
if passed:
    child = os.fork()
    if child == 0:  # a forked child accepts on the passed socket, as prefork serve's children do
        signal.alarm(20)
        conn, _ = passed[0][1].accept()
        conn.sendall(b"accepted by %d" % os.getpid())
        os._exit(0)
    # a program run from here does not get the passed descriptors (close-on-exec)
    out["passed_links"] = [os.readlink(f"/proc/self/fd/{s.fileno()}") for _, s in passed]
    seen = subprocess.run([sys.executable, "-c", "import os; print([os.readlink(f'/proc/self/fd/{fd}') "
                           "for fd in os.listdir('/proc/self/fd') if os.path.exists(f'/proc/self/fd/{fd}')])"],
                          close_fds=False, capture_output=True, text=True, check=True).stdout
    out["exec_links"] = json.loads(seen.replace("'", '"'))
    out["exec_env"] = subprocess.run([sys.executable, "-c", "import os; print(sorted(k for k in os.environ "
                                      "if k.startswith('LISTEN_')))"], capture_output=True, text=True).stdout.strip()
print(json.dumps(out), flush=True)
if child:
    os.waitpid(child, 0)
"""


_launched: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _kill_what_a_failed_test_left() -> Iterator[None]:
    """A test that fails half-way leaves its server or probe (and their children) running: end them."""
    yield
    while _launched:
        proc = _launched.pop()
        family = descendants(proc.pid) if proc.poll() is None else set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session it leads (a probe's forked child included)
        for pid in family:  # workers that made process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None or proc.returncode is None:
            proc.communicate(timeout=10)
        wait_until(functools.partial(_all_gone, family), 10, what="the server's processes to end")


def _all_gone(pids: set[int]) -> bool:
    return not any(map(pid_alive, pids))


def launch(argv: list[str], passed: list[Any], env: dict[str, str], **popen: Any) -> subprocess.Popen[str]:
    """Run ``argv`` as systemd runs a socket-activated service: ``passed`` (sockets or fds) at fd 3..."""
    fds = [p if isinstance(p, int) else p.fileno() for p in passed]
    spec = {"fds": fds, "env": env, "argv": argv}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(spec)], pass_fds=fds, text=True,
                            env={**base, "PYTHONPATH": str(ROOT), **popen.pop("extra_env", {})},
                            start_new_session=True, **popen)
    _launched.append(proc)
    return proc


def probe(passed: list[Any], env: dict[str, str], unset: bool = True) -> tuple[dict[str, Any], subprocess.Popen[str]]:
    proc = launch([sys.executable, "-c", PROBE, json.dumps(unset)], passed, env,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=20)
        pytest.fail(f"the probe said nothing: {err}")
    return json.loads(line), proc


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise AssertionError("the probe did not finish") from None
    assert proc.returncode == 0, err
    return err


ACTIVATED = {"LISTEN_PID": "$PID", "LISTEN_FDS": "1"}


def test_a_passed_listening_socket_is_taken_unset_close_on_exec_and_accepted_on_by_a_forked_child() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        out, proc = probe([lst], {**ACTIVATED, "LISTEN_FDNAMES": "web"})
        [got] = out["sockets"]
        assert got == {"name": "web", "fd": 3, "family": "AF_INET", "type": "SOCK_STREAM",
                       "address": f"127.0.0.1:{port}", "inheritable": False, "backlog": None}
        assert out["env"] == [] and out["exec_env"] == "[]"  # gone for the process and what it runs
        [link] = out["passed_links"]
        assert link.startswith("socket:[") and link not in out["exec_links"]  # close-on-exec: a program it runs
        assert any(x.startswith("socket:[") for x in out["exec_links"]) is False  # holds no socket at all
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.settimeout(10)
            answer = c.recv(100)
        assert answer.startswith(b"accepted by ")
        finish(proc)


def test_several_sockets_keep_their_order_and_unnamed_ones_are_unknown(tmp_path: Path) -> None:
    path = str(tmp_path / "http.sock")
    with socket.create_server(("127.0.0.1", 0)) as tcp, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(path)
        unix.listen()
        out, proc = probe([tcp, unix], {**ACTIVATED, "LISTEN_FDS": "2"})
        assert [(s["fd"], s["name"], s["family"], s["address"]) for s in out["sockets"]] == [
            (3, "unknown", "AF_INET", f"127.0.0.1:{tcp.getsockname()[1]}"), (4, "unknown", "AF_UNIX", path)]
        with socket.create_connection(("127.0.0.1", tcp.getsockname()[1]), timeout=10) as c:
            c.settimeout(10)
            assert c.recv(100).startswith(b"accepted by ")
        finish(proc)


def test_sockets_for_another_pid_are_left_alone_with_a_warning() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        out, proc = probe([lst], {"LISTEN_PID": "1", "LISTEN_FDS": "1"})
        assert out["sockets"] == [] and "error" not in out and out["env"] == []
        err = finish(proc)
        assert "LISTEN_PID=1 is not this process" in err and "exec" in err


def test_unset_environment_false_keeps_the_variables() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        out, proc = probe([lst], {**ACTIVATED, "LISTEN_FDNAMES": "web"}, unset=False)
        assert out["env"] == ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"]
        with socket.create_connection(lst.getsockname(), timeout=10) as c:
            c.settimeout(10)
            c.recv(100)
        finish(proc)


@contextlib.contextmanager
def not_a_listener(kind: str, tmp_path: Path) -> Iterator[tuple[list[Any], str]]:
    """A descriptor systemd might pass by mistake, and what the refusal must say about it."""
    with contextlib.ExitStack() as stack:
        if kind == "udp":
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            s.bind(("127.0.0.1", 0))
            yield [s], f"fd 3 is a datagram socket (SOCK_DGRAM) on 127.0.0.1:{s.getsockname()[1]}"
        elif kind == "connected":
            a, b = socket.socketpair()
            stack.enter_context(a)
            stack.enter_context(b)
            yield [a], "fd 3 is a stream socket that is not listening (connected to an unnamed unix socket)"
        elif kind == "bound":
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            yield [s], f"not listening (bound to 127.0.0.1:{s.getsockname()[1]})"
        elif kind == "fresh":
            s = stack.enter_context(socket.socket())
            yield [s], "not listening (neither bound nor connected)"
        elif kind == "seqpacket":
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
            s.bind(str(tmp_path / "seq"))
            s.listen()
            yield [s], "fd 3 is a SOCK_SEQPACKET socket"
        elif kind == "file":
            f = stack.enter_context(open(tmp_path / "plain", "w"))
            yield [f.fileno()], "fd 3 is a regular file, not a socket"
        elif kind == "pipe":
            r, w = os.pipe()
            stack.callback(os.close, r)
            stack.callback(os.close, w)
            yield [r], "fd 3 is a pipe (FIFO), not a socket"
        elif kind == "missing":
            s = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            yield [s], "fd 4 is not open"  # LISTEN_FDS=2, one passed


@pytest.mark.parametrize("kind", ["udp", "connected", "bound", "fresh", "seqpacket", "file", "pipe", "missing"])
def test_a_descriptor_that_is_not_a_listening_stream_socket_is_refused_naming_it(kind: str, tmp_path: Path) -> None:
    with not_a_listener(kind, tmp_path) as (passed, says):
        out, proc = probe(passed, {**ACTIVATED, "LISTEN_FDS": "2" if kind == "missing" else "1"})
        if kind == "missing":
            assert 4 not in out["open_before"]
        assert says in out["error"], out["error"]
        assert out["error"].startswith("LISTEN_FDS: ") and "\n" not in out["error"]
        assert "ListenStream=" in out["error"]
        assert out["env"] == []  # unset even when refused
        finish(proc)


@pytest.mark.parametrize(("env", "says"), [
    ({"LISTEN_PID": "x$PID", "LISTEN_FDS": "1"}, "LISTEN_PID='x"),
    ({"LISTEN_PID": "$PID", "LISTEN_FDS": "-3"}, "LISTEN_FDS='-3'"),
    ({"LISTEN_PID": "$PID", "LISTEN_FDS": "4294967296"}, "RLIMIT_NOFILE"),
])
def test_malformed_variables_are_refused_and_unset_in_a_real_process(env: dict[str, str], says: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        out, proc = probe([lst], env)
        assert says in out["error"] and out["env"] == [] and out["sockets"] == []
        finish(proc)


# -- the passed socket against mpm.bind ----------------------------------------------------------------


def test_same_place_compares_addresses_not_spellings() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lo, socket.create_server(("0.0.0.0", 0)) as anyv4, \
            socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as any6:
        p, q, r = (s.getsockname()[1] for s in (lo, anyv4, any6))
        assert _same_place(f"127.0.0.1:{p}", lo) and _same_place(f"localhost:{p}", lo)
        assert _same_place("127.0.0.1:0", lo)  # port 0: any port
        assert not _same_place(f"127.0.0.1:{p + 1 if p < 65535 else p - 1}", lo)
        assert not _same_place(f"0.0.0.0:{p}", lo)  # every address is not this host only
        assert not _same_place(f"10.1.2.3:{p}", lo)
        assert not _same_place(f"no-such-host.invalid:{p}", lo)
        for spelling in (f"0.0.0.0:{q}", f":{q}", f"[::]:{q}"):
            assert _same_place(spelling, anyv4), spelling
        for spelling in (f"0.0.0.0:{r}", f":{r}", f"[::]:{r}", f":::{r}"):
            assert _same_place(spelling, any6), spelling
        assert not _same_place(f"127.0.0.1:{r}", any6)


INHERIT = r"""
import json, socket, struct, sys
from prefork import _systemd
from prefork.config import load_config
from prefork.errors import ConfigError
config = load_config(None, json.loads(sys.argv[1]))
try:
    sock = _systemd.activated_listener(config)
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104) if sock else b""
    backlog = struct.unpack_from("I", info, 28)[0] if sock else None  # tcpi_sacked: a listener's backlog
    print(json.dumps({"address": sock and _systemd.describe(sock), "backlog": backlog}))
"""


def inherit(passed: list[socket.socket], overrides: dict[str, Any], **env: str) -> tuple[dict[str, Any], str]:
    proc = launch([sys.executable, "-c", INHERIT, json.dumps({"profile": "mpm", **overrides})], passed,
                  {**ACTIVATED, "LISTEN_FDS": str(len(passed)), **env},
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out), err


def test_the_profile_s_bind_gives_way_to_the_passed_socket_and_its_backlog_stays() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=37) as lst:
        got, _ = inherit([lst], {})
        assert got == {"address": f"127.0.0.1:{lst.getsockname()[1]}", "backlog": 37}


def test_a_bind_the_user_set_to_the_same_address_is_fine_and_a_backlog_they_set_applies() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=37) as lst:
        port = lst.getsockname()[1]
        got, _ = inherit([lst], {"mpm.bind": f"localhost:{port}", "mpm.backlog": 9})
        assert got == {"address": f"127.0.0.1:{port}", "backlog": 9}


def test_a_bind_the_user_set_elsewhere_is_refused_naming_both() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        got, _ = inherit([lst], {"mpm.bind": "0.0.0.0:8000"}, LISTEN_FDNAMES="myapp")
        assert got["error"] == (
            f"keyword arguments: mpm.bind = '0.0.0.0:8000', but systemd passed a socket listening on "
            f"127.0.0.1:{port} (fd 3 ('myapp')), which prefork serve uses: remove mpm.bind or make it name "
            "the same address")


def test_two_passed_sockets_are_refused(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as a, socket.create_server(("127.0.0.1", 0)) as b:
        got, _ = inherit([a, b], {})
        assert got["error"].startswith("LISTEN_FDS=2: systemd passed 2 sockets (fd 3 on 127.0.0.1:")
        assert got["error"].endswith("give its .socket unit a single ListenStream=")


def test_nothing_passed_means_bind_it_yourself() -> None:
    got, _ = inherit([], {}, LISTEN_PID="1", LISTEN_FDS="1")  # for another process
    assert got == {"address": None, "backlog": None}


# -- the Announcer: what the loop tells systemd, without a socket or a clock -------------------------

S = 1_000_000_000  # ns


def test_a_life_told_in_order() -> None:
    a = Announcer("127.0.0.1:8000", watchdog=None, status_every=2.0)
    assert a.step(1 * S, Seen(0, 0, 0, False)) == []  # nothing up yet
    assert a.step(2 * S, Seen(2, 0, 1, True)) == [  # a SIGHUP during the start asked systemd nothing
        f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on 127.0.0.1:8000: 2 idle, 0 busy children"]
    assert a.step(3 * S, Seen(1, 1, 1, False)) == []  # changed, but within status_every of the last
    assert a.step(4 * S, Seen(1, 1, 1, False)) == ["STATUS=serving on 127.0.0.1:8000: 1 idle, 1 busy children"]
    assert a.step(10 * S, Seen(1, 1, 1, False)) == []  # unchanged
    assert a.step(11 * S + 5000, Seen(1, 1, 2, True)) == [
        "RELOADING=1\nMONOTONIC_USEC=11000005\nSTATUS=reloading: children replaced one at a time (SIGHUP)"]
    assert a.step(12 * S, Seen(0, 1, 2, True)) == []  # under way
    assert a.step(13 * S, Seen(2, 0, 2, False))[0].startswith("READY=1\n")
    assert a.stopping("asked to") == ["STOPPING=1\nSTATUS=stopping: asked to"]
    assert a.step(14 * S, Seen(0, 0, 3, False)) == [] and a.stopping("again") == []


def test_a_sighup_during_a_reload_gets_its_own_reloading() -> None:
    a = Announcer("x", watchdog=None)
    a.step(0, Seen(1, 0, 0, False))
    assert a.step(1 * S, Seen(1, 0, 1, True))[0].startswith("RELOADING=1\nMONOTONIC_USEC=1000000\n")
    assert a.step(2 * S, Seen(1, 0, 2, True))[0].startswith("RELOADING=1\nMONOTONIC_USEC=2000000\n")
    assert a.step(3 * S, Seen(1, 0, 2, False))[0].startswith("READY=1")


def test_the_watchdog_is_pinged_at_the_first_pass_then_every_interval() -> None:
    a = Announcer("x", watchdog=0.5)
    assert a.step(10 * S, Seen(0, 0, 0, False)) == ["WATCHDOG=1"]
    assert a.timeout(10 * S, 1.0) == 0.5
    assert a.step(10 * S + S // 4, Seen(0, 0, 0, False)) == []
    assert a.timeout(10 * S + S // 4, 1.0) == 0.25 and a.timeout(10 * S, 0.1) == 0.1
    assert a.step(10 * S + S // 2, Seen(1, 0, 0, False))[1:] == ["WATCHDOG=1"]  # READY=1 first
    a.stopping("x")
    assert a.step(20 * S, Seen(1, 0, 0, False)) == [] and a.timeout(20 * S, 1.0) == 1.0
    with pytest.raises(ValueError):
        Announcer("x", watchdog=0.0)


def test_a_new_master_is_quiet_until_it_is_the_main_process_and_the_old_one_hands_over() -> None:
    new = Announcer("x", watchdog=1.0, successor=True)
    assert new.phase == "ready"
    assert new.step(10 * S, Seen(2, 0, 0, False)) == []  # no READY=1 of its own, no ping yet
    assert new.timeout(10 * S, 5.0) == 1.0
    assert new.step(11 * S, Seen(2, 0, 0, False)) == ["WATCHDOG=1"]  # no STATUS= within status_every of its start
    assert new.step(12 * S, Seen(1, 1, 0, False)) == ["STATUS=serving on x: 1 idle, 1 busy children", "WATCHDOG=1"]
    assert new.step(13 * S, Seen(1, 1, 1, True))[0].startswith("RELOADING=1")
    old = Announcer("x", watchdog=1.0)
    old.step(0, Seen(1, 0, 0, False))
    assert old.hand_over(4321) == [
        f"READY=1\nMAINPID=4321\nSTATUS=upgraded: the new master (pid 4321) serves; pid {os.getpid()} drains"]
    assert old.stopping("drained") == [] and old.step(5 * S, Seen(1, 0, 0, False)) == []  # not the main process
    assert old.hand_over(4321) == []


_pass = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2), st.booleans(), st.integers(0, 3 * S))


@settings(max_examples=300)
@given(st.lists(_pass, max_size=60), st.one_of(st.none(), st.floats(0.05, 3.0)), st.booleans(), st.booleans())
def test_any_sequence_of_passes_keeps_systemd_s_rules(
    passes: list[tuple[int, int, int, bool, int]], interval: float | None, stop: bool, successor: bool
) -> None:
    a = Announcer("x", watchdog=interval, status_every=1.0, successor=successor)
    now, hangups = 1000 * S, 0
    phase = "ready" if successor else "starting"
    last_ping: float | None = None
    last_status: float | None = None
    first: float | None = None
    for idle, busy, more_hangups, reloading, gap in passes:
        now += gap
        hangups += more_hangups
        before = a.timeout(now, 1.0)
        assert 0.0 <= before <= 1.0
        out = a.step(now, Seen(idle, busy, hangups, reloading))
        if first is None:
            first = now / S
            if successor:  # quiet at first: one interval before a ping, status_every before a STATUS=
                last_ping = first if interval is not None else None
                last_status = first
        kinds = [m.split("\n", 1)[0].split("=", 1)[0] for m in out]
        assert kinds.count("WATCHDOG") <= 1 and len(kinds) <= 2 and kinds[-1:] != ["STOPPING"]
        if interval is not None:  # pinged exactly when due
            due = last_ping is None or now / S >= last_ping + interval - 1e-9
            assert ("WATCHDOG" in kinds) == due
            if due:
                last_ping = now / S
        else:
            assert "WATCHDOG" not in kinds
        news = [m for m in out if m != "WATCHDOG=1"]
        was = phase
        for m in news:
            f = fields(m)
            if "READY" in f:
                assert phase in ("starting", "reloading") and idle + busy > 0
                assert phase == "starting" or not reloading
                assert f["MAINPID"] == str(os.getpid())
                phase = "ready"
            elif "RELOADING" in f:
                assert phase in ("ready", "reloading") and more_hangups > 0
                assert f["MONOTONIC_USEC"] == str(now // 1000)
                phase = "reloading"
            else:
                assert list(f) == ["STATUS"] and phase == "ready"
                assert last_status is None or now / S - last_status >= 1.0
            last_status = now / S
        if was != "starting" and more_hangups and not any(m.startswith("RELOADING=1") for m in news):
            raise AssertionError(f"a SIGHUP after READY=1 without RELOADING=1: {out}")
        assert a.phase == phase
    if stop:
        assert a.stopping("bye") == ["STOPPING=1\nSTATUS=stopping: bye"]
        assert a.step(now + S, Seen(1, 1, hangups + 1, True)) == [] and a.stopping("bye") == []


# -- the example units -----------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd's keys are case-sensitive
    parser.read_string((EXAMPLES / name).read_text(), source=name)
    return parser


def test_the_service_unit_says_what_prefork_serve_does() -> None:
    u = unit("prefork-serve.service")
    assert u.sections() == ["Unit", "Service", "Install"]
    svc = u["Service"]
    assert svc["Type"] == "notify" and svc["KillSignal"] == "SIGTERM" and svc["KillMode"] == "mixed"
    assert svc["NotifyAccess"] == "main"  # the app in the children cannot speak for the service
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID" and svc["Restart"] == "on-failure"
    argv = shlex.split(svc["ExecStart"])
    assert Path(argv[0]).name == "prefork" and Path(argv[0]).is_absolute()
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("serve", "/etc/myapp/prefork.toml")
    config = load_config(None, {"profile": "mpm"})
    assert float(svc["TimeoutStopSec"]) > config.pool.graceful_timeout
    assert int(svc["WatchdogSec"]) > 0
    assert u["Unit"]["Requires"] == "prefork-serve.socket" and "prefork-serve.socket" in u["Unit"]["After"].split()
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_restart_prevent_exit_status_is_the_status_of_a_refused_config(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('profile = "mpm"\napp = "x:y"\n[scaling]\nmin_spare = 0\n')
    assert cli_main(["serve", "-c", str(tmp_path / "bad.toml")]) == int(unit("prefork-serve.service")["Service"]["RestartPreventExitStatus"])


def test_the_socket_unit_listens_on_one_stream_socket_for_the_service_of_its_name() -> None:
    u = unit("prefork-serve.socket")
    assert u.sections() == ["Unit", "Socket", "Install"]
    sock = u["Socket"]
    assert sock["ListenStream"] == "8000" and "Accept" not in sock  # Accept=no: one socket, handed over
    assert [k for k in sock if k.startswith("Listen")] == ["ListenStream"]  # prefork serve takes one
    assert int(sock["Backlog"]) > 0 and sock["FileDescriptorName"] == "myapp"
    assert u["Install"]["WantedBy"] == "sockets.target"
    assert (EXAMPLES / "prefork-serve.service").is_file()  # the service a socket unit starts: the same name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path) -> None:
    fake = tmp_path / "prefork"  # ExecStart= must name an executable that exists
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    for name in ("prefork-serve.service", "prefork-serve.socket"):
        text = (EXAMPLES / name).read_text().replace("/opt/myapp/venv/bin/prefork", str(fake))
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "prefork-serve.socket"),
                           str(tmp_path / "prefork-serve.service")], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


# -- the docs ----------------------------------------------------------------------------------------


def test_the_docs_show_the_example_units_as_they_are() -> None:
    assert block("service") == (EXAMPLES / "prefork-serve.service").read_text()
    assert block("socket") == (EXAMPLES / "prefork-serve.socket").read_text()


def test_the_docs_links_lead_to_files() -> None:
    where = ROOT / "docs" / "profiles"  # the section's home: docs/profiles/mpm.md
    text = section()
    start = text.index("### systemd")
    for target in re.findall(r"\]\(([^)#]+)", text[start:]):
        if target.startswith("http"):
            continue
        assert (where / target).resolve().is_file(), target


def test_the_docs_config_loads_and_the_install_commands_name_the_units(tmp_path: Path) -> None:
    (tmp_path / "prefork.toml").write_text(block("config"))
    config = load_config(tmp_path / "prefork.toml")
    assert (config.profile, config.name, config.app) == ("mpm", "myapp", "myapp:handle")
    assert "mpm.bind" not in config.sources or config.sources["mpm.bind"].startswith("profile ")
    assert config.pool.graceful_timeout < float(unit("prefork-serve.service")["Service"]["TimeoutStopSec"])
    commands = [shlex.split(line) for line in block("install").splitlines()]
    assert commands[0][0] == "cp" and all((ROOT / f).is_file() for f in commands[0][1:-1])
    assert {Path(f).name for f in commands[0][1:-1]} == {"prefork-serve.socket", "prefork-serve.service"}
    assert commands[1] == ["systemctl", "daemon-reload"]
    assert commands[2] == ["systemctl", "enable", "--now", "prefork-serve.socket"]


def status_sample() -> dict[str, Any]:
    text = block("status")
    return {
        "status": re.search(r'Status: "(.*)"', text).group(1),  # type: ignore[union-attr]
        "main": re.search(r"Main PID: (\d+) \((.*)\)", text).groups(),  # type: ignore[union-attr]
        "tasks": int(re.search(r"Tasks: (\d+)", text).group(1)),  # type: ignore[union-attr]
        "titles": re.findall(r'[├└]─\d+ "(.*)"', text),
    }


def test_the_docs_upgrade_command_signals_the_main_process_only() -> None:
    [command] = [shlex.split(line) for line in block("upgrade").splitlines()]
    assert command == ["systemctl", "kill", "--kill-whom=main", "--signal=SIGUSR2", "prefork-serve"]
    if shutil.which("systemctl") is not None:
        helped = subprocess.run(["systemctl", "--help"], capture_output=True, text=True, timeout=30).stdout
        for option in (arg.split("=")[0] for arg in command if arg.startswith("--")):
            assert option in helped, option


def test_the_docs_numbers_are_the_code_s(monkeypatch: pytest.MonkeyPatch) -> None:
    text = section()
    assert f"at most every {_systemd.STATUS_EVERY:g} s" in text.replace("\n", " ")
    watchdog = unit("prefork-serve.service")["Service"]["WatchdogSec"]
    monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog) * 1_000_000))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    interval = _systemd.watchdog_interval()
    assert f"With `WatchdogSec={watchdog}` the supervisor's loop sends `WATCHDOG=1` every {interval:g} s" in \
        " ".join(text.split())


def test_the_status_line_in_the_docs_is_one_prefork_serve_sends() -> None:
    sample = status_sample()
    a = Announcer("[::]:8000", watchdog=None)
    [ready] = a.step(0, Seen(3, 1, 0, False))
    assert fields(ready)["STATUS"] == sample["status"]


# -- prefork serve under a fake systemd ------------------------------------------------------------------

APP = """\
import os

AT_IMPORT = {k for k in os.environ if k.startswith("LISTEN_")}

def handle(conn, addr):
    with conn.makefile("rb") as lines:
        line = lines.readline()
    leaked = ",".join(sorted(AT_IMPORT | {k for k in os.environ if k.startswith("LISTEN_")})) or "-"
    conn.sendall(b"%d %s %s\\n" % (os.getpid(), leaked.encode(), line.strip()))
"""


class Served:
    """``prefork serve -c <the docs' config>`` started as systemd starts it."""

    def __init__(self, tmp_path: Path, passed: list[socket.socket], notify: str, *settings: str,
                 env: dict[str, str] | None = None) -> None:
        (tmp_path / "myapp.py").write_text(APP)
        config = tmp_path / "prefork.toml"
        config.write_text(block("config"))
        argv = [sys.executable, "-m", "prefork", "serve", "-c", str(config), *settings]
        activation = {**ACTIVATED, "LISTEN_FDNAMES": "myapp"} if passed else {}  # none passed: not activated
        self.proc = launch(argv, passed, {**activation, **(env or {})}, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           extra_env={"NOTIFY_SOCKET": notify, "PYTHONFAULTHANDLER": "1"})

    def stop(self, timeout: float = 30, signum: int | None = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None and signum is not None:
            self.proc.send_signal(signum)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"prefork serve ignored SIGTERM for {timeout} s\n{err}") from None
        wait_until(lambda: not descendants(self.proc.pid) and not pid_alive(self.proc.pid), 10,
                   what="the server's processes to be gone")
        return self.proc.returncode, err


def workers_of(master: int) -> set[int]:
    found = set()
    for pid in descendants(master):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip() == b"myapp worker":
                found.add(pid)
    return found


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def ask(address: Any, text: str, family: int = socket.AF_INET) -> tuple[int, str]:
    with socket.socket(family) as c:
        c.settimeout(20)
        c.connect(address)
        c.sendall(text.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = c.recv(200)
            assert chunk, f"closed without an answer ({answer!r})"
            answer += chunk
    pid, leaked, echoed = answer.decode().split()
    assert echoed == text
    return int(pid), leaked


def test_serve_takes_the_socket_says_ready_reloading_ready_stopping_from_its_main_pid(
    tmp_path: Path, receiver: Receiver
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        server = Served(tmp_path, [lst], os.environ["NOTIFY_SOCKET"], "--set", "mpm.read_timeout=10",
                        env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "$PID"})
        try:
            ready, before = receiver.until("READY=1")
            assert set(before) <= {"WATCHDOG=1"}
            got = fields(ready)
            assert got["MAINPID"] == str(server.proc.pid)
            assert re.fullmatch(rf"serving on 127\.0\.0\.1:{port}: [1-9]\d* idle, 0 busy children", got["STATUS"])
            first, leaked = ask(("127.0.0.1", port), "hello")
            assert leaked == "-"  # no LISTEN_* in the children, nor when the app was imported
            assert first in descendants(server.proc.pid)
            for _ in range(3):  # WatchdogSec=0.4: a ping every 0.2 s while it idles
                receiver.until("WATCHDOG=1", timeout=10)

            old_workers = workers_of(server.proc.pid)
            assert old_workers
            sent_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            server.proc.send_signal(signal.SIGHUP)  # systemctl reload: ExecReload=/bin/kill -HUP $MAINPID
            reloading, before = receiver.until("RELOADING=1")
            assert set(before) <= {"WATCHDOG=1"} | {m for m in before if m.startswith("STATUS=serving on")}
            assert int(fields(reloading)["MONOTONIC_USEC"]) >= sent_at  # what Type=notify-reload waits for
            again, between = receiver.until("READY=1")
            assert not any(map(pid_alive, old_workers))  # READY=1 once the chain replaced every child
            assert all(m == "WATCHDOG=1" for m in between)
            assert fields(again)["MAINPID"] == str(server.proc.pid)
            wait_until(lambda: ask(("127.0.0.1", port), "after")[0] != first, 20,
                       what="a new child to answer after the reload")

            server.proc.send_signal(signal.SIGTERM)  # systemctl stop
            stopping, _ = receiver.until("STOPPING=1")
            assert fields(stopping)["STATUS"].startswith("stopping: ")
            code, err = server.stop()
            assert code == 0, err
        finally:
            if server.proc.poll() is None:
                server.stop()
    assert {pid for _, pid in receiver.seen} == {server.proc.pid}  # NotifyAccess=main would take them all
    assert receiver.pending() == []  # nothing after STOPPING=1


def test_without_socket_activation_it_binds_mpm_bind_and_notifies_the_same(tmp_path: Path, receiver: Receiver) -> None:
    server = Served(tmp_path, [], os.environ["NOTIFY_SOCKET"], "--set", "mpm.bind=127.0.0.1:0")
    try:
        assert server.proc.stdout is not None
        line = server.proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        ready, _ = receiver.until("READY=1")
        assert fields(ready)["STATUS"].startswith(f"serving on 127.0.0.1:{port}: ")
        assert ask(("127.0.0.1", port), "bound")[1] == "-"
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert "STOPPING=1" in receiver.until("STOPPING=1")[0]


def test_an_upgrade_makes_the_new_master_systemd_s_main_process(
    tmp_path: Path, receiver: Receiver, prefork_subreaper: None
) -> None:
    """What systemd with NotifyAccess=main takes: messages from the main process only,
    and MAINPID= from it changes which process that is."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        server = Served(tmp_path, [lst], os.environ["NOTIFY_SOCKET"],
                        env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "$PID"})
        old, new = server.proc.pid, 0
        try:
            receiver.until("READY=1")
            ask(("127.0.0.1", port), "before")
            server.proc.send_signal(signal.SIGUSR2)  # systemctl kill --kill-whom=main --signal=SIGUSR2
            main, taken, ignored = old, [], []
            end = time.monotonic() + 30
            while not new:
                text, pid = receiver.next(max(0.01, end - time.monotonic()))
                if pid != main:
                    ignored.append(text)
                    continue
                taken.append(text)
                if "MAINPID" in fields(text) and int(fields(text)["MAINPID"]) != main:
                    new = main = int(fields(text)["MAINPID"])
            handed = fields(taken[-1])
            assert handed["READY"] == "1"
            assert handed["STATUS"] == f"upgraded: the new master (pid {new}) serves; pid {old} drains"
            assert all(m == "WATCHDOG=1" or m.startswith("STATUS=") for m in ignored)  # the new one kept quiet
            assert server.proc.wait(timeout=30) == 0  # the old master drained and left
            while receiver.next() != ("WATCHDOG=1", new):  # the new master pings: it took the watchdog
                pass
            assert ask(("127.0.0.1", port), "after")[0] in descendants(new)
            os.kill(new, signal.SIGTERM)  # systemctl stop
            receiver.until("STOPPING=1")
            assert receiver.seen[-1][1] == new
            wait_until(lambda: reaped(new), 30, what="the new master to stop")
        finally:
            family = ({new} | descendants(new)) if new else set()
            for pid in family:  # a failed test: the new master and its children are orphans of this subreaper
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_until(lambda: all(reaped(pid) or not pid_alive(pid) for pid in family), 10,
                       what="the new master's processes to be gone")
        stops = [pid for text, pid in receiver.seen if text.startswith("STOPPING=1")]
        assert stops == [new]  # the old master said nothing after it handed over


def test_a_restart_refuses_nobody_the_next_server_answers_who_connected_in_between(
    tmp_path: Path, receiver: Receiver
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:  # held here, as systemd holds it
        port = lst.getsockname()[1]
        first = Served(tmp_path, [lst], os.environ["NOTIFY_SOCKET"])
        receiver.until("READY=1")
        old_pid, _ = ask(("127.0.0.1", port), "one")
        code, err = first.stop()
        assert code == 0, err
        with socket.create_connection(("127.0.0.1", port), timeout=20) as waiting:  # no server: it waits
            waiting.sendall(b"in between\n")
            second = Served(tmp_path, [lst], os.environ["NOTIFY_SOCKET"])
            try:
                receiver.until("READY=1")
                waiting.settimeout(20)
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = waiting.recv(200)
                    assert chunk, "the connection made between the two servers was closed"
                    answer += chunk
                assert answer.decode().endswith(" in between\n") and int(answer.split()[0]) != old_pid
            finally:
                code, err = second.stop()
            assert code == 0, err


def test_a_bind_that_contradicts_the_passed_socket_stops_the_start_with_status_2(
    tmp_path: Path, receiver: Receiver
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        server = Served(tmp_path, [lst], os.environ["NOTIFY_SOCKET"], "--set", "mpm.bind=127.0.0.1:1")
        code, err = server.stop(signum=None)  # it leaves by itself
        assert code == 2
        assert err.strip().splitlines()[-1] == (
            f"prefork: error: keyword arguments: mpm.bind = '127.0.0.1:1', but systemd passed a socket listening "
            f"on 127.0.0.1:{lst.getsockname()[1]} (fd 3 ('myapp')), which prefork serve uses: remove mpm.bind "
            "or make it name the same address")
    assert receiver.pending() == []  # never said READY=1


def test_the_status_sample_s_processes_are_the_ones_prefork_serve_runs(tmp_path: Path, receiver: Receiver) -> None:
    sample = status_sample()
    workers = sample["titles"].count("myapp worker")
    with socket.create_server(("127.0.0.1", 0)) as lst:
        server = Served(tmp_path, [lst], os.environ["NOTIFY_SOCKET"])
        try:
            receiver.until("READY=1")

            def processes() -> dict[int, str] | None:
                found = {}
                for pid in {server.proc.pid} | descendants(server.proc.pid):
                    try:
                        found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                    except OSError:
                        return None
                return found if list(found.values()).count("myapp worker") == workers else None

            found = wait_until(processes, 20, what=f"{workers} workers")
            assert found is not None and sorted(found.values()) == sorted(sample["titles"])
            comm = Path(f"/proc/{server.proc.pid}/comm").read_text().strip()
            assert sample["main"][1] == comm  # systemctl shows the 15-character kernel name
            assert sum(map(threads, found)) == sample["tasks"]  # Tasks: counts threads
        finally:
            code, err = server.stop()
        assert code == 0, err


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed")
def test_systemd_s_own_socket_activator_starts_it_on_the_first_connection(tmp_path: Path, receiver: Receiver) -> None:
    path = str(tmp_path / "http.sock")
    (tmp_path / "myapp.py").write_text(APP)
    (tmp_path / "prefork.toml").write_text(block("config"))
    env = {"PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"], "PREFORK_DISABLE_PLUGIN_AUTOLOAD": "1",
           "XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"]}  # it passes on only what it is told
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "--fdname=myapp", *(f"-E{k}={v}" for k, v in env.items()),
         sys.executable, "-m", "prefork", "serve", "-c", str(tmp_path / "prefork.toml")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode), 20, what="the socket")
        assert receiver.pending() == []  # nothing started yet: the first connection starts it
        pid, leaked = ask(path, "first", socket.AF_UNIX)
        assert leaked == "-"
        ready, _ = receiver.until("READY=1")
        assert fields(ready)["MAINPID"] == str(proc.pid)  # it exec'd: systemd's pid is the server's
        assert fields(ready)["STATUS"].startswith(f"serving on {path}: ")
        assert pid in descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            raise
    assert proc.returncode == 0, err
    receiver.until("STOPPING=1")
