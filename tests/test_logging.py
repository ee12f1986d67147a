"""prefork's logging: ``prefork._logging.configure``, the text and JSON formats, records made
in forked workers of a real pool, ``prefork serve`` and the MPM data-hook process through
their named loggers, and docs/logging.md run block by block.

docs/logging.md marks its blocks with an HTML comment on the line before the fence:
``<!-- file: NAME -->`` a file the reader saves; ``<!-- shell -->`` a command run where those
files are (``<!-- shell: fails -->``: the text block after it is its whole stderr);
``<!-- sample: json -->`` / ``<!-- sample: text -->`` a record as the page shows it;
``<!-- run -->`` a program, run as a script.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from prefork import Executor, _logging
from prefork._logging import JSON_KEYS, JsonFormatter, configure, parse_level, role_of, set_role
from prefork.errors import ConfigError
from prefork.testing import descendants, wait_until

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "logging.md"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The root logger's handlers and level, and this process's role, put back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(_logging, "_role", _logging._role)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def strict_json(line: str) -> dict[str, Any]:
    """One record: a JSON object, NaN and Infinity refused as JSON refuses them."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON: {line!r}")

    obj = json.loads(line, parse_constant=refuse)
    assert isinstance(obj, dict), line
    return obj


def records(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a record: a line that is not one fails the test."""
    return [strict_json(line) for line in text.splitlines()]


def make_record(msg: str, *args: Any, extra: dict[str, Any] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom in the test")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.getLogger("t.records").makeRecord("t.records", logging.INFO, __file__, 1, msg, args, exc_info,
                                                     extra=extra)


# -- levels and formats: what configure takes, what it refuses ---------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("debug", logging.DEBUG), ("INFO", logging.INFO), (" Warning\n", logging.WARNING), ("warn", logging.WARNING),
    ("error", logging.ERROR), ("CRITICAL", logging.CRITICAL), (logging.INFO, logging.INFO), (50, 50),
])  # fmt: skip
def test_a_level_is_a_known_name_in_any_case_or_a_known_number(given: str | int, expected: int) -> None:
    assert parse_level(given) == expected


@given(st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none(), st.floats(), st.binary(max_size=8)))
def test_anything_else_is_refused_as_a_level_in_one_line_naming_it(level: Any) -> None:
    known = logging.getLevelNamesMapping()
    if isinstance(level, str):
        assume(known.get(level.strip().upper(), 0) == 0)
    elif isinstance(level, int) and not isinstance(level, bool):
        assume(level not in known.values() or level == 0)
    with pytest.raises(ConfigError) as err:
        parse_level(level)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message == f"log level {level!r} is not a level; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"


@pytest.mark.parametrize(("level", "fmt", "error"), [
    ("loud", "json", "log level 'loud' is not a level; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("NOTSET", "text", "log level 'NOTSET' is not a level"),
    ("info", "xml", "log format 'xml' is not a format; use one of text, json"),
    ("info", "", "log format '' is not a format"),
    ("info", "json lines", "log format 'json lines' is not a format"),
])  # fmt: skip
def test_configure_refuses_a_bad_level_or_format_in_one_line_and_changes_nothing(
    level: str, fmt: str, error: str, fresh_logging: None
) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with pytest.raises(ConfigError) as err:
        configure(level, fmt, stream=io.StringIO())
    assert str(err.value).startswith(error) and len(str(err.value).splitlines()) == 1
    assert (list(root.handlers), root.level) == before


def test_configure_again_replaces_its_handler_and_sets_the_root_level(fresh_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    h1 = configure("debug", "text", stream=first)
    h2 = configure("WARNING", "JSON", stream=second)
    root = logging.getLogger()
    assert h2 in root.handlers and h1 not in root.handlers
    assert root.level == logging.WARNING
    logging.getLogger("t.again").info("not at warning")
    logging.getLogger("t.again").warning("at warning")
    assert first.getvalue() == ""
    assert [r["message"] for r in records(second.getvalue())] == ["at warning"]


# -- the text format -------------------------------------------------------------------------------------------


def test_text_is_time_level_logger_pid_message_with_the_traceback_below(fresh_logging: None) -> None:
    out = io.StringIO()
    configure("info", "text", stream=out)
    log = logging.getLogger("t.text")
    before = datetime.now(UTC)
    log.debug("too low")
    log.info("hello %s", "there")
    try:
        raise KeyError("missing")
    except KeyError:
        log.exception("it failed")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(rf"({TIME}) INFO t\.text \[{os.getpid()}\] hello there", lines[0]), lines
    stamp = datetime.strptime(lines[0].split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((stamp - before).total_seconds()) < 5  # UTC, not local time
    assert re.fullmatch(rf"{TIME} ERROR t\.text \[{os.getpid()}\] it failed", lines[1]), lines
    assert lines[2] == "Traceback (most recent call last):" and lines[-1] == "KeyError: 'missing'"
    assert not any("too low" in line for line in lines)


# -- the JSON format -----------------------------------------------------------------------------------------


def test_json_has_every_field_and_the_callers_extras(fresh_logging: None) -> None:
    out = io.StringIO()
    configure("info", "json", stream=out)
    set_role("supervisor")
    log = logging.getLogger("t.json")
    before = datetime.now(UTC)
    log.info("plain %d", 1, extra={"job": "demo", "n": 3, "tags": ["a", "b"]})
    try:
        raise ValueError("bad value 42")
    except ValueError:
        log.error("with a traceback\nand a second line", exc_info=True, stack_info=True)
    plain, failed = records(out.getvalue())
    assert plain == {"time": plain["time"], "level": "INFO", "logger": "t.json", "pid": os.getpid(),
                     "role": "supervisor", "message": "plain 1", "job": "demo", "n": 3, "tags": ["a", "b"]}
    assert list(plain)[:6] == ["time", "level", "logger", "pid", "role", "message"]
    assert re.fullmatch(TIME, plain["time"])
    stamp = datetime.strptime(plain["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((stamp - before).total_seconds()) < 5
    assert failed["level"] == "ERROR" and failed["message"] == "with a traceback\nand a second line"
    assert failed["exc_info"].startswith("Traceback (most recent call last):")
    assert failed["exc_info"].endswith("ValueError: bad value 42")
    assert failed["stack_info"].startswith("Stack (most recent call last):")
    assert "exc_info" not in plain and "stack_info" not in plain


def test_an_extra_named_like_a_field_is_kept_beside_it_never_over_it() -> None:
    # (exc_info, stack_info and message are the record's own: logging refuses them as extras)
    extra = {"pid": "mine", "role": "mine too", "time": 0, "level": "x", "logger": "y", "extra_pid": "already prefixed"}
    line = JsonFormatter().format(make_record("m", extra=extra))
    rec = strict_json(line)
    assert rec["pid"] == os.getpid() and rec["logger"] == "t.records" and rec["level"] == "INFO"
    assert "exc_info" not in rec and "stack_info" not in rec and rec["message"] == "m"
    kept = {k: v for k, v in rec.items() if k.startswith("extra_")}
    assert sorted(map(str, kept.values())) == sorted(map(str, extra.values()))  # all six, none lost
    assert kept["extra_pid"] == "mine" and kept["extra_extra_pid"] == "already prefixed"


class Shy:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def cycle() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(("value", "written"), [
    (math.nan, "nan"), (math.inf, "inf"), ({(1, 2): "tuple key"}, "{(1, 2): 'tuple key'}"), (b"\x00\xff", "b'\\x00\\xff'"),
    ({1, 2}, "{1, 2}"), (Path("/tmp/x"), "PosixPath('/tmp/x')"), (cycle(), "[[...]]"),
    (Shy(), "<Shy: repr() failed: RuntimeError('no repr for you')>"),
])  # fmt: skip
def test_an_extra_json_cannot_hold_is_written_as_its_repr(value: Any, written: str) -> None:
    line = JsonFormatter().format(make_record("odd", extra={"odd": value, "fine": [1, 2]}))
    rec = strict_json(line)
    assert rec["odd"] == written and rec["fine"] == [1, 2] and rec["message"] == "odd"


JSONABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=())),  # lone surrogates too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
EXTRA_KEY = st.text(min_size=1, max_size=12).filter(
    lambda k: k not in _logging._RECORD_KEYS and k not in JSON_KEYS and not k.startswith("extra_")
)


@given(message=st.text(st.characters(exclude_categories=())), extra=st.dictionaries(EXTRA_KEY, JSONABLE, max_size=5),
       exc=st.booleans())
def test_any_record_is_one_line_of_strict_json_that_gives_back_message_and_extras(
    message: str, extra: dict[str, Any], exc: bool
) -> None:
    record = make_record("%s", message, extra=extra, exc=exc)
    line = JsonFormatter().format(record)
    assert line.isascii() and len(line.splitlines()) == 1  # whatever the message: no newline, any stream encoding
    rec = strict_json(line)
    assert rec["message"] == message
    assert ("exc_info" in rec) == exc
    assert {k: rec[k] for k in extra} == extra
    assert set(rec) == {"time", "level", "logger", "pid", "message", *extra} | ({"exc_info"} if exc else set()) | (
        {"role"} if role_of(os.getpid()) else set())


# -- the process's role ---------------------------------------------------------------------------------------------


def test_a_role_is_one_of_four_and_holds_only_in_the_process_that_set_it(fresh_logging: None) -> None:
    with pytest.raises(ValueError, match="process role 'boss': expected one of data-hook, fork-server, supervisor, worker"):
        set_role("boss")
    set_role("supervisor")
    assert role_of(os.getpid()) == "supervisor" and role_of(os.getpid() + 1) is None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that never says what it is: no role in its records
        try:
            os.write(w, JsonFormatter().format(make_record("from the child")).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = strict_json(f.read())
    os.waitpid(pid, 0)
    assert child["pid"] == pid and "role" not in child and child["message"] == "from the child"


# -- forked workers of a real pool -------------------------------------------------------------------------------


def logs_in_a_task(n: int) -> int:
    log = logging.getLogger("userapp.tasks")
    log.info("task %d running", n, extra={"n": n})  # INFO: the worker has the root level configure set
    try:
        raise ValueError(f"bad input {n}")
    except ValueError:
        log.exception("task %d failed", n)
    return os.getpid()


@pytest.mark.parametrize("fork_from", ["forkserver", "direct"])
def test_a_task_logs_json_with_its_workers_pid_through_the_configured_handler(
    fork_from: str, tmp_path: Path, fresh_logging: None
) -> None:
    path = tmp_path / "log.jsonl"
    with open(path, "a") as stream:  # O_APPEND: the processes' lines never overwrite each other
        configure("info", "json", stream=stream)
        with Executor(2, overrides={"pool.fork_from": fork_from}) as pool:
            pids = list(pool.map(logs_in_a_task, range(6)))
    got = records(path.read_text())
    mine = [r for r in got if r["logger"] == "userapp.tasks"]
    assert len(mine) == 12, got
    for rec in mine:
        assert rec["pid"] in pids and rec["pid"] != os.getpid() and rec["role"] == "worker"
    running = sorted((r for r in mine if r["level"] == "INFO"), key=lambda r: r["n"])
    assert [r["message"] for r in running] == [f"task {n} running" for n in range(6)]
    assert [r["pid"] for r in running] == pids  # each record names the worker that ran the task
    failed = [r for r in mine if r["level"] == "ERROR"]
    assert all(r["exc_info"].endswith(f"ValueError: bad input {r['message'].split()[1]}") for r in failed)
    # the supervisor's own records (forks, exits) come through the same handler, with its pid
    assert any(r["logger"].startswith("prefork") and r["pid"] == os.getpid() for r in got), got


POOL_SCRIPT = """\
import logging, os, sys
from prefork import Executor, WorkerLost
from prefork._logging import configure

def finalizer():
    raise RuntimeError("finalizer boom")

def task(n):
    logging.getLogger("userapp").info("task %d", n)
    return os.getpid()

def die():
    os._exit(3)

if __name__ == "__main__":
    configure(sys.argv[1], "json")
    with Executor(2, overrides={"pool.finalizer": finalizer}) as pool:
        try:
            pool.submit(die).result()
        except WorkerLost:
            pass
        print(os.getpid(), *sorted(set(pool.map(task, range(4)))))
"""


def test_every_line_a_pool_writes_to_stderr_is_json_failures_included(tmp_path: Path) -> None:
    """No print anywhere: a worker's death, tasks' records and failing finalizers, all records."""
    (tmp_path / "pool_script.py").write_text(POOL_SCRIPT)
    out = subprocess.run([sys.executable, "pool_script.py", "info"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    got = records(out.stderr)
    me, *pids = (int(p) for p in out.stdout.split())
    task_pids = set(pids)
    tasks = [r for r in got if r["logger"] == "userapp"]
    assert len(tasks) == 4 and {r["pid"] for r in tasks} <= task_pids and all(r["role"] == "worker" for r in tasks)
    died = [r for r in got if "died unexpectedly" in r["message"]]
    assert len(died) == 1 and died[0]["level"] == "WARNING" and died[0]["pid"] == me
    finals = [r for r in got if r["logger"] == "prefork.worker"]
    assert finals and all(r["level"] == "ERROR" and r["role"] == "worker" for r in finals)
    for rec in finals:
        assert rec["message"] == f"the finalizer of worker {rec['pid']} failed; it exits with code 5"
        assert rec["exc_info"].endswith("RuntimeError: finalizer boom")
    assert task_pids <= {r["pid"] for r in finals}  # every worker that ran a task left through its finalizer


# -- prefork serve ------------------------------------------------------------------------------------------------


LINE_APP = """\
import os

def handle(conn, addr):
    with conn.makefile("rb") as lines:
        line = lines.readline()
    if line == b"boom\\n":
        raise ValueError("boom from the app")
    conn.sendall(b"%d" % os.getpid())
"""

SERVE_SCRIPT = """\
import sys
from prefork._logging import configure
from prefork.config import load_config
from prefork.serve import serve

configure("info", "json")
config = load_config(None, {
    "profile": "mpm", "app": "lineapp:handle", "mpm.bind": "127.0.0.1:0", "mpm.read_timeout": 0.5,
    "scaling.tick": 0.05, "scaling.start_servers": 1, "scaling.min_spare": 1, "scaling.max_spare": 1,
    "scaling.max_servers": 1,
})
sys.exit(serve(config, lambda host, port: print(port, flush=True)))
"""


class Lines:
    """A pipe read by a thread, line by line, so a test can wait for a line while the process runs."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def find(self, text: str) -> list[dict[str, Any]]:
        return [r for r in records("\n".join(self.lines)) if text in r["message"]]


def ask(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(line)
        conn.shutdown(socket.SHUT_WR)
        return conn.recv(100)


def test_serve_logs_its_address_a_failing_app_a_cut_connection_and_a_vain_signal(tmp_path: Path) -> None:
    (tmp_path / "lineapp.py").write_text(LINE_APP)
    (tmp_path / "serve_script.py").write_text(SERVE_SCRIPT)
    proc = subprocess.Popen([sys.executable, "serve_script.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert proc.stdout is not None and proc.stderr is not None
    err = Lines(proc.stderr)
    try:
        port = int(proc.stdout.readline())
        child = int(ask(port, b"hello\n"))
        assert ask(port, b"boom\n") == b""  # the app raised: the connection is closed
        wait_until(lambda: err.find("the app failed"), what="the app's failure logged")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            assert silent.recv(100) == b""  # cut off after mpm.read_timeout
        wait_until(lambda: err.find("waited longer"), what="the cut connection logged")
        assert descendants(proc.pid) >= {child}
        proc.send_signal(signal.SIGTTOU)  # min_spare is 1 already
        wait_until(lambda: err.find("SIGTTOU changed nothing"), what="the vain signal logged")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.thread.join(timeout=10)
    assert proc.returncode == 0, err.lines
    serve = [r for r in records("\n".join(err.lines)) if r["logger"] == "prefork.serve"]
    listening, failed, cut, vain = (err.find(t)[0] for t in ("listening on", "the app failed", "waited longer",
                                                                "SIGTTOU changed nothing"))
    assert len(serve) == 4, serve
    assert listening["message"] == f"listening on 127.0.0.1:{port} (app lineapp:handle)"
    assert (listening["level"], listening["pid"], listening["role"]) == ("INFO", proc.pid, "supervisor")
    assert (failed["level"], failed["pid"], failed["role"]) == ("ERROR", child, "worker")
    assert failed["message"].startswith(f"worker {child}: the app failed on the connection from ('127.0.0.1', ")
    assert failed["exc_info"].endswith("ValueError: boom from the app")
    assert (cut["level"], cut["pid"], cut["role"]) == ("WARNING", child, "worker")
    assert "waited longer than mpm.read_timeout = 0.5 s" in cut["message"] and "exc_info" not in cut
    assert (vain["level"], vain["pid"], vain["role"]) == ("WARNING", proc.pid, "supervisor")
    assert vain["message"] == "SIGTTOU changed nothing: the least a server keeps is 1 (min_spare = 1)"


# -- the MPM's data-hook process and a failing body --------------------------------------------------------------


MPM_SCRIPT = """\
import signal, sys, time
from pathlib import Path
from prefork import mpm
from prefork._logging import configure

mark = Path(sys.argv[1])

def hook(pid, data, code):
    mark.write_text(str(pid))
    raise ValueError(f"hook boom on {data}")

def child():
    # done() may SIGTERM this child as soon as the hook has its data: blocked, it cannot cut the log short
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    mpm.yell("hello")
    raise RuntimeError("body boom")

configure("info", "json")
m = mpm.MPM(start_servers=1, min_spare_servers=0, max_spare_servers=1, max_servers=1, child_data_hook=hook,
            data_hook_in_main=False, overrides={"scaling.tick": 0.05})
end = time.monotonic() + 20
while not mark.exists() and time.monotonic() < end:
    m.whip_kids(child, timeout=0.1)
m.done()
print(mark.read_text() if mark.exists() else "no data")
"""


def test_the_data_hook_process_and_a_failing_body_log_with_their_roles(tmp_path: Path) -> None:
    (tmp_path / "mpm_script.py").write_text(MPM_SCRIPT)
    out = subprocess.run([sys.executable, "mpm_script.py", str(tmp_path / "mark")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    yelled = int(out.stdout)
    got = records(out.stderr)
    hook = [r for r in got if r["logger"] == "prefork.mpm"]
    assert hook and all(r["role"] == "data-hook" and r["pid"] not in (yelled,) for r in hook), hook
    assert hook[0]["message"].startswith("child_data_hook <function hook at ")
    assert hook[0]["message"].endswith(f"failed on data from child {yelled}; the data-hook process goes on")
    assert hook[0]["exc_info"].endswith("ValueError: hook boom on hello")
    body = [r for r in got if r["logger"] == "prefork.worker" and r["pid"] == yelled]
    assert len(body) == 1 and body[0]["role"] == "worker" and body[0]["level"] == "ERROR"
    assert body[0]["message"] == f"the body of worker {yelled} failed; it exits with code 6"
    assert body[0]["exc_info"].endswith("RuntimeError: body boom")


# -- every logger is named, and named on the page ----------------------------------------------------------------


def test_every_logger_prefork_makes_is_named_in_docs_and_the_page_names_no_other() -> None:
    made = {m.group(1): path.relative_to(ROOT) for path in (ROOT / "prefork").rglob("*.py")
            for m in re.finditer(r"getLogger\(\s*[\"']([^\"']+)[\"']", path.read_text())}
    documented = set(re.findall(r"^\| `(prefork[\w.]*)` \|", DOC.read_text(), re.MULTILINE))
    unnamed = {name: str(path) for name, path in made.items() if name == "prefork"}
    assert not unnamed, f"log under a name of its own, not 'prefork': {unnamed}"
    assert set(made) == documented, (sorted(set(made) - documented), sorted(documented - set(made)))


# -- docs/logging.md, run --------------------------------------------------------------------------------------------


class Block(NamedTuple):
    mark: str  # "file: app.py", "shell", "shell: fails", "sample: json", "run", "" (unmarked)
    lang: str
    text: str


def doc_blocks() -> list[Block]:
    found = re.finditer(r"(?:<!-- (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<text>.*?)```", DOC.read_text(), re.DOTALL)
    return [Block(m["mark"] or "", m["lang"], m["text"]) for m in found]


def block(mark: str) -> Block:
    (only,) = [b for b in doc_blocks() if b.mark == mark]
    return only


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command)
    assert argv[0] == "prefork", command
    return subprocess.run([sys.executable, "-m", "prefork", *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=ENV)


@pytest.fixture
def doc_dir(tmp_path: Path) -> Path:
    for b in doc_blocks():
        if b.mark.startswith("file: "):
            (tmp_path / b.mark.removeprefix("file: ")).write_text(b.text)
    return tmp_path


def test_docs_every_block_is_marked_for_this_module() -> None:
    marks = [b.mark for b in doc_blocks()]
    assert marks == ["file: app.py", "shell", "sample: json", "sample: text", "shell: fails", "", "run"], marks


def test_docs_the_json_command_gives_records_shaped_as_the_sample(doc_dir: Path) -> None:
    out = run_shell(block("shell").text.strip(), doc_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "14\n"
    sample = strict_json(block("sample: json").text.strip())
    got = records(out.stderr)
    squares = [r for r in got if r["logger"] == "myapp"]
    assert sorted(r["message"] for r in squares) == [f"squaring {n}" for n in range(4)]
    for rec in squares:
        assert set(rec) == set(sample)  # the page shows every field a task's record has
        assert (rec["level"], rec["role"], rec["job"]) == (sample["level"], sample["role"], sample["job"])
        assert re.fullmatch(TIME, rec["time"]) and re.fullmatch(TIME, sample["time"])
    assert {r["role"] for r in got if r["pid"] != squares[0]["pid"] and r["logger"].startswith("prefork")} >= {
        "supervisor"}


def test_docs_the_text_format_is_shaped_as_the_sample(doc_dir: Path) -> None:
    out = run_shell(block("shell").text.strip().replace("json", "text"), doc_dir)
    assert out.returncode == 0, out.stderr
    shape = rf"{TIME} INFO myapp \[\d+\] squaring \d"
    assert re.fullmatch(shape, block("sample: text").text.strip())
    assert len([line for line in out.stderr.splitlines() if re.fullmatch(shape, line)]) == 4, out.stderr


def test_docs_a_bad_level_stops_the_command_in_the_line_shown(doc_dir: Path) -> None:
    blocks = doc_blocks()
    i = blocks.index(block("shell: fails"))
    out = run_shell(blocks[i].text.strip(), doc_dir)
    assert out.returncode == 2
    assert out.stderr == blocks[i + 1].text
    assert out.stdout == ""


def test_docs_the_program_logs_from_its_workers_and_quiets_prefork(tmp_path: Path) -> None:
    (tmp_path / "program.py").write_text(block("run").text)
    proc = subprocess.run([sys.executable, "program.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[1, 2, 3]\n"
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr  # the three tasks' records; prefork's INFO records (forks, exits) quiet
    for line in lines:
        pid, name, level, *message = line.split()
        assert (name, level) == ("myapp", "INFO") and " ".join(message).startswith("working on ")
        assert int(pid) != os.getpid()  # a worker's


def test_docs_a_queue_handler_read_by_a_thread_gets_no_worker_records(tmp_path: Path) -> None:
    """What the page warns about, shown: the records of a task stay in the worker's copy of the queue."""
    script = textwrap.dedent("""\
        import logging, logging.handlers, queue, sys
        from prefork import Executor

        def work(x):
            logging.getLogger("myapp").warning("in a worker %d", x)
            return x

        if __name__ == "__main__":
            q = queue.Queue()
            logging.getLogger().addHandler(logging.handlers.QueueHandler(q))
            listener = logging.handlers.QueueListener(q, logging.StreamHandler(sys.stdout))
            listener.start()
            logging.getLogger("myapp").warning("in the caller")
            with Executor(1) as pool:
                list(pool.map(work, range(3)))
            listener.stop()
    """)
    (tmp_path / "queued.py").write_text(script)
    proc = subprocess.run([sys.executable, "queued.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "in the caller" in proc.stdout and "in a worker" not in proc.stdout + proc.stderr
