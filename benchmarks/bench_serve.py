"""Serve benchmark: ``prefork serve --wsgi`` against gunicorn's sync workers, driven by wrk.

Both servers run the same WSGI app (benchmarks/_wsgi_bench_app.py) with the same
number of worker processes (``--workers``, default 4), one server at a time:

  prefork   python -m prefork serve --wsgi benchmarks._wsgi_bench_app:app
            --set mpm.bind=127.0.0.1:0 --set scaling.name=fixed --set scaling.workers=N
  gunicorn  python -m gunicorn --workers N --worker-class sync -b 127.0.0.1:0
            benchmarks._wsgi_bench_app:app

Each scenario starts a fresh server, checks that it answers correctly (GET /
and GET /cpu return the app's bodies), warms it up with wrk, measures with wrk
(``--latency``; the numbers come from a Lua ``done`` hook, latencies in µs), and
stops it.  wrk keeps one connection per worker by default (``--connections``),
as a proxy in front of a sync server would:

  keepalive  GET / (100 bytes), wrk's connections kept alive
  close      GET /, every request on a new connection ("Connection: close")
  cpu        GET /cpu (about 2 ms of CPU per request), keep-alive
  slow       GET /, keep-alive, while K slow clients (a helper process) each hold
             a connection and send one header byte every 100 ms, never ending
             their headers (slowloris); one the server closes is reopened
  paced      as keepalive, and as close (paced-close), but each wrk connection
             pauses 1 ms between a response and its next request: about a
             quarter of the load the others put on, where latency is not
             mostly the wait for a CPU that the other scenarios saturate

gunicorn's sync worker answers every request with "Connection: close", so wrk
reconnects after each response there whatever the scenario asks for; a prefork
child keeps a connection as long as its client sends requests.

While wrk runs, a probe in this process opens a NEW connection every 100 ms,
sends GET / and times the response (timeout 2 s): what a newcomer sees while
wrk's connections (or the slow clients) hold the workers.  wrk's own numbers
cover only the connections that got answers, and a connection never answered
counts as no error there; the probe shows whether others waited.

Scenarios and servers are interleaved over ``--rounds`` (the server order
alternates each round); the table shows medians over the rounds, errors summed
over them, and the ratios prefork/gunicorn for requests/s and gunicorn/prefork
for latencies (both: > 1 means prefork is better).

    python benchmarks/bench_serve.py                   # 3 rounds x 5 s, under 3 minutes
    python benchmarks/bench_serve.py --quick           # smoke run, about 20 s
    python benchmarks/bench_serve.py --scenarios slow --slow-clients 4 --seconds 40 --rounds 1
                                     # every worker under slowloris, past both servers' timeouts

Every server, helper and wrk process is stopped and reaped before the next run
starts; the benchmark checks that none of its descendants is left at the end.
Needs wrk (Debian: apt-get install wrk) and gunicorn (pip install -r
benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's prefork, as the servers'

import prefork
from benchmarks._wsgi_bench_app import HELLO, cpu_body
from prefork.testing import descendants

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
APP = "benchmarks._wsgi_bench_app:app"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "serve.json"
TITLE = "bench_serve"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = ("prefork", "gunicorn")
#: how long a wrk request, a probe or a start-up check may take
REQUEST_TIMEOUT = 2.0
#: one header byte per slow connection this often (seconds)
SLOW_INTERVAL = 0.1
#: seconds between two probe connections
PROBE_INTERVAL = 0.1
#: seconds from the start of wrk to the first probe
PROBE_DELAY = 0.2
#: no probe starts in the last PROBE_GUARD seconds of wrk's run
PROBE_GUARD = 0.5
#: settings a server would take from the environment: each server runs with its defaults plus the flags above
IGNORED_ENV = ("GUNICORN_CMD_ARGS",)
SS = shutil.which("ss")  # iproute2: the accept queue (without it, the slow clients get 0.5 s to be accepted)

#: name -> (path, extra wrk header, slow clients?, what it measures)
SCENARIOS: dict[str, tuple[str, str | None, bool, str]] = {
    "keepalive": ("/", None, False, "GET / (100 bytes), keep-alive"),
    "close": ("/", "Connection: close", False, "GET /, a new connection per request"),
    "cpu": ("/cpu", None, False, "GET /cpu (~2 ms of CPU), keep-alive"),
    "slow": ("/", None, True, "GET /, keep-alive, with K slowloris clients"),
    "paced": ("/", None, False, "GET /, keep-alive, each connection pausing 1 ms between requests (~25 % load)"),
    "paced-close": ("/", "Connection: close", False, "GET /, a new connection per request, 1 ms pauses"),
}
#: scenarios whose wrk connections pause PACE_MS between a response and their next request
PACED = frozenset({"paced", "paced-close"})
PACE_MS = 1

#: wrk's summary as one line of JSON (latencies in µs)
WRK_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "max_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


class BenchError(Exception):
    """A server or tool that does not do what the benchmark needs: one line, the run stops."""


# -- processes ----------------------------------------------------------------------------------


def _proc_table() -> tuple[dict[int, tuple[int, str, str]], dict[int, int]]:
    """pid -> (ppid, state, cmdline) and pid -> CPU ticks, for every readable process.

    The ticks are the process's own (utime + stime) and those of its children it
    has reaped (cutime + cstime): summed over a process tree, CPU used by a
    process that died and was reaped inside the tree is still counted."""
    table: dict[int, tuple[int, str, str]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(rest[1]), rest[0], cmd)
        ticks[int(entry)] = sum(int(x) for x in rest[11:15])
    return table, ticks


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over ``seconds``: other load skews a benchmark."""
    busy0, total0 = cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = cpu_jiffies()
    return (busy1 - busy0) / max(1, total1 - total0)


def our_cpu() -> float:
    """CPU seconds of this process (the probe) and of its reaped children (wrk, once it has exited)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_thread(thread: threading.Thread) -> None:
    """Start ``thread`` with SIGINT/SIGTERM blocked in it: they reach the main thread only."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# -- the servers ----------------------------------------------------------------------------------


def gunicorn_has_control_socket() -> bool:
    """gunicorn 24+ opens a control socket in ~/.gunicorn unless told not to."""
    out = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=30)
    return "--no-control-socket" in out.stdout


def server_command(kind: str, workers: int, name: str, gunicorn_flags: list[str]) -> tuple[list[str], re.Pattern[str]]:
    """The command line that starts ``kind`` on a free port, and the line it prints with the port."""
    if kind == "prefork":
        return [
            sys.executable, "-m", "prefork", "serve", "--wsgi", APP,
            "--set", f"mpm.bind={HOST}:0",
            "--set", "scaling.name=fixed", "--set", f"scaling.workers={workers}",
            "--set", f"name={name}",  # its title and its control socket: unique to this run
        ], re.compile(r"prefork serve: listening on \S+:(\d+)")
    return [
        sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "sync",
        "-b", f"{HOST}:0", *gunicorn_flags, APP,
    ], re.compile(r"Listening at: http://\S+:(\d+)")


def http_get(port: int, path: str, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """One server under test, started as a command in a process group of its own."""

    def __init__(self, kind: str, args: argparse.Namespace, logdir: Path, serial: int) -> None:
        self.kind = kind
        self.workers = args.workers
        cmd, self.pattern = server_command(kind, args.workers, f"{TITLE}-{os.getpid()}-{serial}", args.gunicorn_flags)
        self.log_path = logdir / f"{serial:03d}-{kind}.log"
        self.seen: set[int] = set()
        self.port = 0
        # Run from an empty directory, the repository on the path: neither server reads a config
        # file of the directory it starts in (the repository's prefork.toml is a `prefork run` job)
        path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        env = {k: v for k, v in os.environ.items() if k not in IGNORED_ENV}
        env.update(PYTHONPATH=path, PYTHONUNBUFFERED="1")
        with self.log_path.open("wb") as log:
            # its own process group: Ctrl-C reaches only this benchmark, which stops the server
            # in order; a group kill is the last resort for a process that survives that
            self.proc = subprocess.Popen(cmd, cwd=args.rundir, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, process_group=0)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def fail(self, what: str) -> BenchError:
        return BenchError(f"{self.kind}: {what}; its log ({self.log_path}):\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the port is known, GET / and GET /cpu answer the app's bodies and every worker runs."""
        end = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"exited during start-up (status {self.proc.returncode})")
            if not self.port:
                found = self.pattern.search(self.log_path.read_text(errors="replace"))
                self.port = int(found.group(1)) if found else 0
            if self.port:
                try:
                    checks = [(path, want, *http_get(self.port, path)) for path, want in (("/", HELLO), ("/cpu", cpu_body()))]
                except (OSError, http.client.HTTPException) as exc:
                    last = f"GET failed: {exc!r}"
                else:
                    bad = [f"GET {p} answered {status} {body[:60]!r}, expected 200 {want[:60]!r}"
                           for p, want, status, body in checks if status != 200 or body != want]
                    if bad:
                        raise self.fail("; ".join(bad))  # a wrong answer is not going to get better
                    workers = self.view()[0]
                    if workers >= self.workers:
                        return
                    last = f"{workers} of {self.workers} workers running"
            if time.monotonic() > end:
                raise self.fail(f"not ready after {timeout:g} s ({last})")
            time.sleep(0.05)

    def view(self) -> tuple[int, float]:
        """(worker processes running, CPU seconds used so far by the server's processes)."""
        table, ticks = _proc_table()
        below = descendants(self.proc.pid, table)
        self.seen |= below
        workers = sum(1 for pid in below if "worker" in table[pid][2] and table[pid][1] != "Z")
        return workers, sum(ticks.get(pid, 0) for pid in below | {self.proc.pid}) / CLK_TCK

    def stop(self) -> list[int]:
        """SIGTERM the master, reap it, wait for every process it had; the pids that had to be killed."""
        killed: list[int] = []
        if self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"{TITLE}: {self.kind} master {self.proc.pid} ignored SIGTERM for 30 s; killing its group",
                      file=sys.stderr)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
                killed.append(self.proc.pid)
        end = time.monotonic() + 10  # its children are reaped by their own parents
        while (left := [p for p in self.seen if _alive(p)]) and time.monotonic() < end:
            time.sleep(0.02)
        for p in left:
            print(f"{TITLE}: {self.kind} left process {p} behind; killing it", file=sys.stderr)
            try:
                os.kill(p, signal.SIGKILL)
                killed.append(p)
            except ProcessLookupError:
                pass
        return killed


# -- the load -------------------------------------------------------------------------------------


def accept_queue(port: int) -> int | None:
    """Connections waiting in the accept queue of the server listening on ``port`` (None: unknown).

    ``ss -l`` asks the kernel for listening sockets only (over netlink), so a reading
    costs the same however many connections in TIME_WAIT the load left behind;
    reading /proc/net/tcp would walk them all.  For a listening socket, Recv-Q is
    the number of connections whose handshake is done and no process accepted yet."""
    if SS is None:
        return None
    try:
        out = subprocess.run([SS, "-Hltn", "sport", "=", f":{port}"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    waiting = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("LISTEN")]
    return sum(waiting) if out.returncode == 0 and waiting else None


def run_wrk(args: argparse.Namespace, port: int, path: str, header: str | None, seconds: int,
            lua: Path) -> dict[str, Any]:
    cmd = [args.wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
           "--timeout", f"{REQUEST_TIMEOUT:g}s", "--latency", "-s", str(lua)]
    if header:
        cmd += ["-H", header]
    cmd.append(f"http://{HOST}:{port}{path}")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish {seconds + 60} s after a {seconds} s run") from exc
    finally:  # Ctrl-C included: subprocess.run would leave it unreaped
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    found = re.search(r"^WRKJSON (\{.*\})$", stdout, re.M)
    if proc.returncode or not found:
        raise BenchError(f"wrk failed (status {proc.returncode}): {(stderr or stdout).strip()[:500]}")
    res: dict[str, Any] = json.loads(found.group(1))
    res["text"] = stdout[: found.start()].rstrip()  # wrk's own report
    return res


class Probe(threading.Thread):
    """A newcomer: a new connection every PROBE_INTERVAL, GET /, timed; until stopped."""

    def __init__(self, port: int, seconds: float) -> None:
        super().__init__(name="probe", daemon=True)
        self.port = port
        self.start_at = time.monotonic()
        #: wrk stops at about this moment; a probe answered later waited for that, not for the server
        self.end_at = self.start_at + seconds
        self.halt = threading.Event()
        self.latencies: list[float] = []
        self.failures: dict[str, int] = {}

    def run(self) -> None:
        self.halt.wait(PROBE_DELAY)  # wrk's connections first
        while not self.halt.is_set() and time.monotonic() < self.end_at - PROBE_GUARD:
            t0 = time.perf_counter()
            try:
                status, body = http_get(self.port, "/")
            except (OSError, http.client.HTTPException) as exc:
                self.failed("timeout" if isinstance(exc, TimeoutError) else type(exc).__name__)
            else:
                if status != 200 or body != HELLO:
                    self.failed(f"status {status}")
                elif time.monotonic() > self.end_at:  # it waited until wrk let go of the workers
                    self.failed(f"unanswered while the load ran (at least {PROBE_GUARD:g} s)")
                else:
                    self.latencies.append((time.perf_counter() - t0) * 1e6)
            self.halt.wait(max(0.0, PROBE_INTERVAL - (time.perf_counter() - t0)))

    def failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    def result(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "sent": len(lat) + sum(self.failures.values()),
            "ok": len(lat),
            "failures": dict(self.failures),
            "p50_us": statistics.median(lat) if lat else None,
            "max_us": lat[-1] if lat else None,
            "latencies_us": [round(x) for x in self.latencies],
        }


def slow_clients(port: int, count: int) -> int:
    """The slowloris helper (``--slow-helper``): ``count`` connections, each sending one
    header byte every SLOW_INTERVAL and never ending its headers; one the server
    closes is reopened at once.  Prints "ready" once all are connected, and its
    statistics as JSON when SIGTERM arrives."""
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: halt.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the benchmark stops us
    head = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: {TITLE}-slow\r\n".encode()
    stats: dict[str, Any] = {"opened": 0, "closed_by_server": 0, "connect_errors": 0, "responses": {},
                             "bytes_sent": 0, "held_s": []}
    sel = selectors.DefaultSelector()
    conns: dict[socket.socket, list[Any]] = {}  # sock -> [next byte index, opened at]

    def open_one() -> None:
        try:
            s = socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT)
            s.sendall(head)
        except OSError:
            stats["connect_errors"] += 1
            return
        s.setblocking(False)
        stats["opened"] += 1
        conns[s] = [0, time.monotonic()]
        sel.register(s, selectors.EVENT_READ)

    def closed(s: socket.socket, data: bytes) -> None:
        if data.startswith(b"HTTP/1."):
            code = data.split(b" ", 2)[1].decode(errors="replace")
            stats["responses"][code] = stats["responses"].get(code, 0) + 1
        stats["closed_by_server"] += 1
        stats["held_s"].append(round(time.monotonic() - conns[s][1], 2))
        sel.unregister(s)
        del conns[s]
        s.close()

    for _ in range(count):
        open_one()
    print("ready", flush=True)
    next_tick = time.monotonic()
    while not halt.is_set():
        for key, _ in sel.select(max(0.0, next_tick - time.monotonic())):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            closed(s, data)  # an answer (408, 400...) or the end: either way the server let go
        if time.monotonic() < next_tick:
            continue
        next_tick += SLOW_INTERVAL
        for s, state in list(conns.items()):
            line = b"X-Slow-%04d: x\r\n" % (state[0] // 16 % 10_000)  # 16 bytes a line, never a blank one
            try:
                sent = s.send(line[state[0] % 16 : state[0] % 16 + 1])
            except OSError:
                closed(s, b"")
                continue
            state[0] += sent
            stats["bytes_sent"] += sent
        while len(conns) < count and not halt.is_set():
            before = stats["connect_errors"]
            open_one()
            if stats["connect_errors"] > before:
                break  # try again at the next tick
    stats["open_at_end"] = len(conns)
    for s in conns:
        s.close()
    print(json.dumps(stats), flush=True)
    return 0


class SlowClients:
    """The slowloris helper, a process of its own."""

    def __init__(self, port: int, count: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--slow-helper", f"{port}:{count}"],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready = [False]

        def wait_line() -> None:
            assert self.proc.stdout is not None
            ready[0] = self.proc.stdout.readline().strip() == "ready"

        t = threading.Thread(target=wait_line, daemon=True)
        start_thread(t)
        t.join(count * REQUEST_TIMEOUT + 10)
        if not ready[0]:
            self.stop()
            raise BenchError(f"the slow clients did not connect to port {port}")

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        last = (out or "").strip().splitlines()[-1:] or ["{}"]
        try:
            stats: dict[str, Any] = json.loads(last[0])
        except json.JSONDecodeError:
            stats = {}
        held = stats.pop("held_s", [])
        stats["held_s_median"] = statistics.median(held) if held else None
        return stats


def run_one(kind: str, scenario: str, args: argparse.Namespace, logdir: Path, serial: int,
            lua: Path) -> dict[str, Any]:
    path, header, slow, _ = SCENARIOS[scenario]
    server = Server(kind, args, logdir, serial)
    helper: SlowClients | None = None
    probe: Probe | None = None
    try:
        server.wait_ready()
        if args.warmup:
            run_wrk(args, server.port, path, header, args.warmup, lua)
        if slow and args.slow_clients:
            helper = SlowClients(server.port, args.slow_clients)
            # until the workers took the slow connections (those beyond the workers wait)
            left = max(0, args.slow_clients - args.workers)
            end = time.monotonic() + 5
            while (n := accept_queue(server.port)) is not None and n > left and time.monotonic() < end:
                time.sleep(0.02)
            if n is None:
                time.sleep(0.5)
        _, cpu0 = server.view()
        busy0, total0 = cpu_jiffies()
        ours0 = our_cpu()
        probe = Probe(server.port, args.seconds)
        start_thread(probe)
        res = run_wrk(args, server.port, path, header, args.seconds, lua)
        probe.halt.set()
        busy1, total1 = cpu_jiffies()
        workers, cpu1 = server.view()
        probe.join(REQUEST_TIMEOUT + 5)
        # the machine's busy CPU over the window, less the server's, wrk's and ours: other people's load
        ncpu = os.cpu_count() or 1
        window = (total1 - total0) / CLK_TCK / ncpu
        others = (busy1 - busy0) / CLK_TCK - (cpu1 - cpu0) - (our_cpu() - ours0)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a second Ctrl-C waits for the clean-up
        try:
            if probe is not None:
                probe.halt.set()
            slow_stats = helper.stop() if helper is not None else None  # first: a worker stuck on one lets go
            killed = server.stop()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    requests = res["requests"]
    duration = res["duration_us"] / 1e6
    timed = requests - res["timeout"] > 0  # wrk leaves answers later than its timeout out of its latencies
    out = {
        "requests": requests,
        "rps": requests / duration if duration else 0.0,
        "p50_us": float(res["p50_us"]) if timed else None,
        "p90_us": float(res["p90_us"]) if timed else None,
        "p99_us": float(res["p99_us"]) if timed else None,
        "mean_us": res["mean_us"] if timed else None,
        "max_us": float(res["max_us"]) if timed else None,
        "non2xx": res["status"],
        "socket_errors": {k: res[k] for k in ("connect", "read", "write", "timeout")},
        "server_cpu_us_per_req": (cpu1 - cpu0) / requests * 1e6 if requests else None,
        "other_cpu_pct": round(max(0.0, others) / max(window, 1e-9) / ncpu * 100, 1),
        "workers_at_end": workers,
        "processes_seen": len(server.seen),
        "killed_at_stop": killed,
        "probe": probe.result(),
        "wrk": res["text"],
    }
    if slow_stats is not None:
        out["slow_clients"] = slow_stats
    return out


# -- the report -----------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    """The median of the rounds that produced a value (None when none did)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario, by_server in runs.items():
        servers: dict[str, Any] = {}
        for kind, rounds in by_server.items():
            probes = [r["probe"] for r in rounds]
            servers[kind] = {
                "rps": _median([r["rps"] for r in rounds]),
                "p50_us": _median([r["p50_us"] for r in rounds]),
                "p99_us": _median([r["p99_us"] for r in rounds]),
                "server_cpu_us_per_req": _median([r["server_cpu_us_per_req"] for r in rounds]),
                "non2xx": sum(r["non2xx"] for r in rounds),
                "socket_errors": sum(sum(r["socket_errors"].values()) for r in rounds),
                "probe_ok": sum(p["ok"] for p in probes),
                "probe_sent": sum(p["sent"] for p in probes),
                "probe_p50_us": _median([p["p50_us"] for p in probes]),
                "other_cpu_pct": _median([r["other_cpu_pct"] for r in rounds]),
                "rounds": rounds,
            }
        p, g = servers.get("prefork"), servers.get("gunicorn")
        ratio = None
        if p and g:
            ratio = {"rps": _ratio(p["rps"], g["rps"]), "p50": _ratio(g["p50_us"], p["p50_us"]),
                     "p99": _ratio(g["p99_us"], p["p99_us"])}
        out[scenario] = {"description": SCENARIOS[scenario][3], "servers": servers, "ratio": ratio}
    return out


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(f"{TITLE}: {args.workers} workers each, wrk -t{args.threads} -c{args.connections}, {args.rounds} round(s) "
          f"x {args.seconds} s per server and scenario, {args.slow_clients} slow client(s) in 'slow'; medians over "
          "rounds, errors summed")
    head = (f"{'scenario':<12} {'server':<9} {'requests/s':>11} {'p50 µs':>9} {'p99 µs':>9} {'non-2xx':>8} "
            f"{'sock err':>8} {'srv CPU/req µs':>14} {'probe ok':>10} {'probe p50 µs':>12} {'other CPU':>9}")
    print(head)
    print("-" * len(head))
    for scenario, entry in summary.items():
        for kind, s in entry["servers"].items():
            flag = ", ".join(what for what, bad in (
                ("no request answered", not s["rps"]), ("non-2xx answers", s["non2xx"]),
                ("socket errors", s["socket_errors"]), ("probes failed", s["probe_ok"] < s["probe_sent"])) if bad)
            flag = f"  <- {flag}" if flag else ""
            print(f"{scenario:<12} {kind:<9} {_fmt(s['rps']):>11} {_fmt(s['p50_us']):>9} {_fmt(s['p99_us']):>9} "
                  f"{s['non2xx']:>8} {s['socket_errors']:>8} {_fmt(s['server_cpu_us_per_req'], '.1f'):>14} "
                  f"{s['probe_ok']:>4}/{s['probe_sent']:<5} {_fmt(s['probe_p50_us']):>12} "
                  f"{_fmt(s['other_cpu_pct'], '.0f'):>8}%{flag}")
        r = entry["ratio"]
        if r:
            print(f"{scenario:<12} {'ratio':<9} {_fmt_ratio(r['rps']):>11} {_fmt_ratio(r['p50']):>9} "
                  f"{_fmt_ratio(r['p99']):>9}")
    print()
    print("ratio: requests/s prefork/gunicorn, latencies gunicorn/prefork: > 1 means prefork is better")
    print(f"probe: a new connection every {PROBE_INTERVAL:g} s during the run, GET /, {REQUEST_TIMEOUT:g} s timeout "
          "(ok/sent); other CPU: the machine's busy CPU not used by the server, wrk or this script")
    for scenario, entry in summary.items():
        print(f"  {scenario:<12} {entry['description']}")
    slow = summary.get("slow")
    if slow:
        for kind, s in slow["servers"].items():
            stats = [r.get("slow_clients") or {} for r in s["rounds"]]
            cut = sum(x.get("closed_by_server", 0) for x in stats)
            answers: dict[str, int] = {}
            for x in stats:
                for code, n in (x.get("responses") or {}).items():
                    answers[code] = answers.get(code, 0) + n
            held = _fmt(_median([x.get("held_s_median") for x in stats]), ".1f")
            print(f"  slow clients under {kind}: " + (
                f"{cut} connection(s) closed by the server after {held} s (median), answers {answers or 'none'}"
                if cut else "none closed by the server: each held its worker to the end of the run"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=None, help="measured seconds per server and scenario (default 5; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of wrk load before measuring (default 1; 0 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="rounds, servers alternating (default 3; 1 with --quick)")
    p.add_argument("--workers", type=int, default=4, help="worker processes of each server (default 4)")
    p.add_argument("--connections", type=int, default=None, help="wrk connections (default: --workers)")
    p.add_argument("--threads", type=int, default=None, help="wrk threads (default: the CPU count, at most --connections)")
    p.add_argument("--slow-clients", type=int, default=None, help="slowloris connections in 'slow' (default: --workers // 2)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {', '.join(SERVERS)}")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--logs", type=Path, default=None, help="keep the servers' logs in this directory (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 s per run, no warm-up, one round")
    p.add_argument("--slow-helper", help=argparse.SUPPRESS)  # PORT:COUNT: run as the slowloris helper
    args = p.parse_args(argv)
    if args.slow_helper:
        port, _, count = args.slow_helper.partition(":")
        return slow_clients(int(port), int(count))

    args.seconds = args.seconds if args.seconds is not None else (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.connections = args.connections if args.connections is not None else args.workers
    args.threads = args.threads if args.threads is not None else min(os.cpu_count() or 1, args.connections)
    args.slow_clients = args.slow_clients if args.slow_clients is not None else args.workers // 2
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    for what, names, known in (("scenario", scenarios, SCENARIOS), ("server", kinds, SERVERS)):
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            p.error(f"--{what}s: unknown {what}(s) {unknown or names}; known: {', '.join(known)}")
    for name in ("seconds", "rounds", "workers", "connections", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name in ("warmup", "slow_clients"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0, not {getattr(args, name)}")
    if args.threads > args.connections:
        p.error(f"--threads {args.threads} > --connections {args.connections}: wrk needs a connection per thread")
    args.wrk = shutil.which("wrk")
    if args.wrk is None:
        p.error("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    if "gunicorn" in kinds and importlib.util.find_spec("gunicorn") is None:
        p.error("gunicorn is not installed (pip install -r benchmarks/requirements.txt), or run --servers prefork")
    args.gunicorn_flags = ["--no-control-socket"] if "gunicorn" in kinds and gunicorn_has_control_socket() else []

    for name in IGNORED_ENV:
        if os.environ.get(name):
            print(f"{TITLE}: note: {name}={os.environ[name]!r} is not passed to the servers: each runs with the "
                  "options shown in benchmarks/bench_serve.py", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupted)  # kill <pid> cleans up as Ctrl-C does
    busy_before = cpu_busy(1.0)
    load_before = os.getloadavg()
    if busy_before > 0.25:
        print(f"{TITLE}: warning: the CPUs were {busy_before:.0%} busy before the run; other processes will skew "
              "the numbers", file=sys.stderr)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {k: [] for k in kinds} for s in scenarios}
    t0 = time.monotonic()
    serial = 0
    with tempfile.TemporaryDirectory(prefix=f"{TITLE}-") as tmp:
        logdir = args.logs or Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        lua = Path(tmp) / "done.lua"
        lua.write_text(WRK_LUA)
        paced_lua = Path(tmp) / "paced.lua"
        paced_lua.write_text(WRK_LUA + f"delay = function()\n  return {PACE_MS}\nend\n")
        args.rundir = Path(tmp) / "cwd"
        args.rundir.mkdir()
        try:
            for rnd in range(args.rounds):
                order = kinds[rnd % len(kinds):] + kinds[: rnd % len(kinds)]  # alternate: no server always first
                for scenario in scenarios:
                    for kind in order:
                        serial += 1
                        res = run_one(kind, scenario, args, logdir, serial,  # stops all it started
                                      paced_lua if scenario in PACED else lua)
                        runs[scenario][kind].append(res)
                        errs = sum(res["socket_errors"].values())
                        probe = res["probe"]
                        print(f"round {rnd + 1}/{args.rounds} {scenario:<11} {kind:<8} {res['rps']:8.0f} req/s  "
                              f"p50 {_fmt(res['p50_us']):>7} µs  p99 {_fmt(res['p99_us']):>7} µs  "
                              f"non-2xx {res['non2xx']}  socket errors {errs}  probe {probe['ok']}/{probe['sent']}  "
                              f"other CPU {res['other_cpu_pct']:.0f}%", flush=True)
        except BenchError as exc:
            print(f"{TITLE}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            left = descendants(os.getpid())
            print(f"{TITLE}: interrupted; processes left behind: {sorted(left) or 'none'}", file=sys.stderr)
            return 130
    summary = summarize(runs)
    print_table(summary, args)

    left = descendants(os.getpid())
    if left:
        print(f"{TITLE}: processes left behind: {sorted(left)}", file=sys.stderr)
    result = {
        "benchmark": TITLE,
        "config": {
            "workers": args.workers, "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
            "wrk_threads": args.threads, "wrk_connections": args.connections, "slow_clients": args.slow_clients,
            "request_timeout_s": REQUEST_TIMEOUT, "hello_bytes": len(HELLO), "quick": args.quick,
            "gunicorn_flags": args.gunicorn_flags,
        },
        "machine": {
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "prefork": getattr(prefork, "__version__", None), "gunicorn": _version("gunicorn"),
            "wrk": _wrk_version(args.wrk), "cpu_busy_before_run": round(busy_before, 3),
            "loadavg_before_run": [round(x, 2) for x in load_before],
        },
        "elapsed_s": round(time.monotonic() - t0, 2),
        "leftover_processes": sorted(left),
        "scenarios": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_name(args.json.name + ".tmp")
    tmp_json.write_text(json.dumps(result, indent=2) + "\n")
    tmp_json.replace(args.json)
    print(f"\nwrote {args.json}")
    return 1 if left else 0


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "?"


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the first server started
        sys.exit(130)
