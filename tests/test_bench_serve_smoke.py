"""Smoke tests of benchmarks/bench_serve.py (prefork serve --wsgi against gunicorn, driven by wrk).

No speed is asserted, ever: the machine running the tests may be busy.  What is
asserted: a quick run measures every scenario on both servers, both answered
(the benchmark checks their bodies first), no answer was an HTTP error, nothing
is left running; the slowloris helper does what the slow scenario relies on;
the app answers what the benchmark expects.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_serve.py"
SCENARIOS = ("keepalive", "close", "cpu", "slow", "paced", "paced-close")
SERVERS = ("prefork", "gunicorn")


def _needs(what: str, present: bool, install: str) -> None:
    if present:
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"bench_serve needs {what}, which CI installs ({install})")
    pytest.skip(f"bench_serve needs {what}: {install}")


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.timeout(150)
def test_a_quick_run_measures_both_servers_in_every_scenario(tmp_path: Path) -> None:
    _needs("wrk", shutil.which("wrk") is not None, "apt-get install wrk")
    _needs("gunicorn", importlib.util.find_spec("gunicorn") is not None, "pip install -r benchmarks/requirements.txt")
    _needs("h11", importlib.util.find_spec("h11") is not None, "pip install h11 (prefork serve's WSGI)")
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--rounds", "1", "--workers", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["leftover_processes"] == []
    assert result["config"]["workers"] == 2 and result["config"]["slow_clients"] == 1
    assert list(result["scenarios"]) == list(SCENARIOS)
    for scenario, entry in result["scenarios"].items():
        assert set(entry["servers"]) == set(SERVERS), scenario
        for kind, s in entry["servers"].items():
            where = (scenario, kind)
            (run,) = s["rounds"]
            assert run["requests"] > 0, where
            for key in ("rps", "p50_us", "p99_us", "server_cpu_us_per_req"):
                assert positive(s[key]), (where, key, s[key])
            assert s["p99_us"] >= s["p50_us"], where
            assert s["non2xx"] == 0, (where, run["wrk"])  # both servers answer the app's 200s
            assert run["workers_at_end"] == 2, where
            assert run["killed_at_stop"] == [], where  # each stopped on SIGTERM, with all its processes
            assert run["probe"]["sent"] >= run["probe"]["ok"] >= 0
            assert "Requests/sec" in run["wrk"]
        for key in ("rps", "p50", "p99"):
            assert positive(entry["ratio"][key]), (scenario, key)
    for kind in SERVERS:
        helper = result["scenarios"]["slow"]["servers"][kind]["rounds"][0]["slow_clients"]
        assert helper["opened"] >= 1 and helper["bytes_sent"] > 0, (kind, helper)
    assert "prefork/gunicorn" in proc.stdout
    for word in (*SCENARIOS, *SERVERS, "ratio"):
        assert word in proc.stdout  # the table


def test_wrong_arguments_are_refused_in_one_line() -> None:
    for args, words in (
        (["--scenarios", "keepalive,nope"], "unknown scenario(s) ['nope']"),
        (["--servers", "uwsgi"], "unknown server(s) ['uwsgi']"),
        (["--workers", "0"], "--workers must be at least 1, not 0"),
        (["--connections", "1", "--threads", "2"], "--threads 2 > --connections 1"),
        (["--slow-clients", "-1"], "--slow-clients must be at least 0, not -1"),
    ):
        proc = subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert words in proc.stderr.strip().splitlines()[-1], (args, proc.stderr)


@pytest.mark.timeout(30)
def test_the_slow_helper_trickles_a_never_ending_head_and_reconnects() -> None:
    """The slow scenario's clients: one header byte per connection every 100 ms, never
    the blank line that ends a head; a connection the server closes is reopened."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    helper = subprocess.Popen([sys.executable, str(BENCH), "--slow-helper", f"{port}:2"],
                              stdout=subprocess.PIPE, text=True)
    conns: list[socket.socket] = []
    try:
        assert helper.stdout is not None
        assert helper.stdout.readline().strip() == "ready"
        listener.settimeout(5)
        conns = [listener.accept()[0] for _ in range(2)]
        got = [b"", b""]
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            for i, c in enumerate(conns):
                c.settimeout(max(0.01, end - time.monotonic()))
                try:
                    got[i] += c.recv(100)
                except TimeoutError:
                    pass
        for data in got:
            head, _, trickle = data.partition(b"User-Agent: bench_serve-slow\r\n")
            assert head.startswith(b"GET / HTTP/1.1\r\nHost: "), data
            assert 5 <= len(trickle) <= 25, data  # about 10 bytes a second, one at a time
            assert trickle == b"X-Slow-0000: x\r\nX-Slow-0001: x\r\n"[: len(trickle)], data
            assert b"\r\n\r\n" not in data
        conns[0].sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        conns[0].close()
        conns.append(listener.accept()[0])  # reopened within a tick
        helper.send_signal(signal.SIGTERM)
        out, _ = helper.communicate(timeout=10)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        for c in conns:
            c.close()
        listener.close()
    assert helper.returncode == 0
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["opened"] == 3 and stats["closed_by_server"] == 1 and stats["responses"] == {"408": 1}
    assert stats["open_at_end"] == 2 and stats["connect_errors"] == 0


def test_the_app_answers_what_the_benchmark_checks() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks._wsgi_bench_app import HELLO, app, cpu_body
    finally:
        sys.path.remove(str(ROOT))
    assert len(HELLO) == 100
    for path, status, body in (("/", "200 OK", HELLO), ("/cpu", "200 OK", cpu_body()),
                               ("/nope", "404 Not Found", b"not found\n")):
        environ: dict[str, object] = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        seen: list[tuple[str, list[tuple[str, str]]]] = []
        answer = b"".join(app(environ, lambda s, h, seen=seen: seen.append((s, h))))
        assert answer == body and seen[0][0] == status
        assert ("Content-Length", str(len(body))) in seen[0][1]
    assert cpu_body().startswith(b"cpu_work(30000) = ")
