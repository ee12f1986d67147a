"""Every prefork command reports an expected failure in one line and a non-zero exit code;
``--traceback`` adds the full traceback; ``prefork --version``.  Run as a user runs them: in
subprocesses."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest


def prefork(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def one_line(out: subprocess.CompletedProcess[str], expected: str) -> None:
    """A failure in one line that starts with ``prefork: error: `` and holds ``expected``."""
    assert out.returncode != 0, out
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("prefork: error: ") and expected in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def with_traceback(out: subprocess.CompletedProcess[str], expected: str) -> None:
    """The same failure with ``--traceback``: the full traceback, then the same one line."""
    assert out.returncode != 0, out
    assert "Traceback (most recent call last):" in out.stderr, out.stderr
    last = out.stderr.splitlines()[-1]
    assert last.startswith("prefork: error: ") and expected in last, out.stderr


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("apps")
    (where / "okapp.py").write_text('def app(environ, start_response):\n    start_response("200 OK", [])\n'
                                    '    return [b"ok"]\n')
    (where / "badsyntax.py").write_text("def app(environ, start_response)\n    pass\n\ndef main(pool)\n    pass\n")
    (where / "raising.py").write_text('raise RuntimeError("no database")\n')
    (where / "initfail.py").write_text(textwrap.dedent("""\
        def init():
            raise RuntimeError("no database")

        def main(pool):
            return pool.submit(abs, -1).result()
    """))
    (where / "crashing.py").write_text('def main(pool):\n    open("/nonexistent/the app\'s own file")\n')
    (where / "fdhog.py").write_text(textwrap.dedent("""\
        import os, resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        _held = []
        try:
            while True:  # every descriptor this process may open: the pool cannot start
                _held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass

        def main(pool):
            return 0
    """))
    (where / "okrun.py").write_text('def main(pool):\n    print("ok")\n    return 0\n')
    (where / "sockets").mkdir(mode=0o700)
    return where


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


SERVE_CASES = {
    "app not importable": (["--wsgi", "nosuchmod:app"], "mpm.wsgi = 'nosuchmod:app': cannot import it: No module named"),
    "syntax error in the app file": (["--wsgi", "badsyntax:app"],
                                     "mpm.wsgi = 'badsyntax:app': cannot import it: SyntaxError: expected ':'"),
    "wsgi app missing": (["--wsgi", "okapp:nothing"],
                         "mpm.wsgi = 'okapp:nothing': cannot import it: module 'okapp' has no attribute 'nothing'"),
    "app raises on import": (["--set", "app=raising:handle"],
                             "app = 'raising:handle': importing it raised RuntimeError: no database"),
}


@pytest.mark.parametrize("case", SERVE_CASES)
def test_serve_reports_a_bad_app_in_one_line(apps: Path, case: str) -> None:
    args, expected = SERVE_CASES[case]
    one_line(prefork("serve", "--set", "mpm.bind=127.0.0.1:0", *args, cwd=apps), expected)
    with_traceback(prefork("serve", "--traceback", "--set", "mpm.bind=127.0.0.1:0", *args, cwd=apps), expected)


def test_serve_reports_a_port_in_use_in_one_line(apps: Path, busy_port: int) -> None:
    expected = f"keyword arguments: mpm.bind = '127.0.0.1:{busy_port}': cannot listen there: Address already in use"
    out = prefork("serve", "--wsgi", "okapp:app", "--set", f"mpm.bind=127.0.0.1:{busy_port}", cwd=apps)
    one_line(out, expected)
    assert out.returncode == 2 and out.stdout == ""
    traced = prefork("--traceback", "serve", "--wsgi", "okapp:app", "--set", f"mpm.bind=127.0.0.1:{busy_port}", cwd=apps)
    with_traceback(traced, expected)
    assert "OSError: [Errno 98] Address already in use" in traced.stderr  # the cause is kept


def test_run_reports_a_syntax_error_in_the_app_in_one_line(apps: Path) -> None:
    expected = "keyword arguments: app = 'badsyntax:main': cannot import it: SyntaxError: expected ':'"
    one_line(prefork("run", "--set", "app=badsyntax:main", cwd=apps), expected)
    with_traceback(prefork("run", "--set", "app=badsyntax:main", "--traceback", cwd=apps), expected)


def test_run_reports_workers_that_cannot_boot_in_one_line(apps: Path) -> None:
    """A pool broken by a failing initializer: the first line of the message and the
    worker's exception; the worker's traceback with --traceback."""
    args = ["run", "--set", "app=initfail:main", "--set", "pool.initializer=initfail:init",
            "--set", "pool.max_boot_failures=1", "--set", "control.enabled=false", "--log-level", "CRITICAL"]
    out = prefork(*args, cwd=apps)
    one_line(out, "workers failed to boot 1 times in a row; the pool is broken. Last failure: RuntimeError: no database "
                  "(more with --traceback)")
    assert out.returncode == 1
    traced = prefork(*args, "--traceback", cwd=apps)
    with_traceback(traced, "Last failure: RuntimeError: no database")
    assert 'initfail.py", line 2, in init' in traced.stderr and "more with --traceback" not in traced.stderr


def test_an_os_error_is_one_line(apps: Path) -> None:
    """Out of file descriptors: the pool cannot start; one line and exit code 1."""
    args = ["run", "--set", "app=fdhog:main", "--set", "control.enabled=false"]
    out = prefork(*args, cwd=apps)
    one_line(out, "[Errno 24] Too many open files")
    assert out.returncode == 1 and out.stderr.rstrip().endswith("(more with --traceback)")
    with_traceback(prefork(*args, "--traceback", cwd=apps), "[Errno 24] Too many open files")


def test_an_exception_of_the_app_itself_keeps_its_traceback(apps: Path) -> None:
    """An OSError prefork meets is one line; one the app lets out is the app's, shown as Python would."""
    out = prefork("run", "--set", "app=crashing:main", "--set", "control.enabled=false", cwd=apps)
    assert out.returncode == 1
    assert out.stderr.startswith("Traceback (most recent call last):"), out.stderr
    assert 'crashing.py", line 2, in main' in out.stderr and "prefork: error" not in out.stderr
    assert out.stderr.splitlines()[-1] == ("FileNotFoundError: [Errno 2] No such file or directory: "
                                           "\"/nonexistent/the app's own file\"")


@pytest.mark.parametrize("args, expected", [
    (["status"], "no pool is running (no live control socket in "),
    (["ctl", "nosuchpool", "stop"], "no pool named 'nosuchpool' is running"),
    (["simulate", "--trace", "missing.csv"], "missing.csv: cannot read the trace: No such file or directory"),
    (["plugins", "-c", "missing.toml"], "missing.toml: cannot read the config file: No such file or directory"),
    (["check", "--set", "pool.kill_grace=-1"], "keyword arguments: pool.kill_grace = -1.0: must be > 0"),
])
def test_every_command_reports_a_failure_in_one_line(apps: Path, args: list[str], expected: str) -> None:
    if args[0] in ("status", "ctl"):
        args = [*args, "--socket-dir", str(apps / "sockets")]
    one_line(prefork(*args, cwd=apps), expected)
    with_traceback(prefork(*args, "--traceback", cwd=apps), expected)
    with_traceback(prefork("--traceback", *args, cwd=apps), expected)


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(tmp_path: Path, flag: str) -> None:
    out = prefork(flag, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"prefork {importlib.metadata.version('prefork')}\n"


def test_run_imports_what_its_own_process_uses_before_a_worker_starts(apps: Path) -> None:
    """A wrong pool.initializer is the same one line as in `prefork check`; a resolver's
    method is the workers' to import, so one never called stops nothing."""
    expected = "keyword arguments: pool.initializer = 'nosuchmod:init': cannot import it: No module named 'nosuchmod'"
    out = prefork("run", "--set", "app=okrun:main", "--set", "pool.initializer=nosuchmod:init", cwd=apps)
    one_line(out, expected)
    assert out.returncode == 2
    unused = prefork("run", "--set", "app=okrun:main", "--set", 'resolver={name = "methods", methods = {x = "nosuchmod:f"}}',
                     "--set", "control.enabled=false", cwd=apps)
    assert unused.returncode == 0 and unused.stdout == "ok\n", unused.stderr
