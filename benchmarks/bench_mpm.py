"""MPM benchmark: prefork's prefork TCP server against a hand-written os.fork + accept loop.

Three echo servers on 127.0.0.1, the same echo handler in each, started and
stopped one after the other, interleaved over several rounds (the order rotates
each round); medians over the rounds are reported:

  baseline   hand-written: the parent binds, os.fork()s 4 children that loop on
             blocking accept() + echo + close; the parent waits
  mpm-fixed  prefork.MPM(start_servers=4, min_spare_servers=0, max_spare_servers=4,
             max_servers=4): a fixed pool of 4; children call busy()/idle()
             around each connection
  mpm-spare  prefork.MPM(start_servers=2, min_spare_servers=2, max_spare_servers=4,
             max_servers=8): the spare policy at its default tick (1 s)

The load comes from several client processes (default 4), each keeping
``--conns`` connections in flight with a selector; every request is a NEW
connection: connect, send one short line, read the echo, close.  Latency is
measured from connect() to the last byte of the echo.  Requests finished during
the warm-up are not counted.  "server CPU/req" is the user+system CPU time of
every server process (parent, fork server, children) over the measured window,
divided by the requests served; it tells server cost apart from the clients',
which share the same cores.

    python benchmarks/bench_mpm.py                      # 3 rounds x 5 s per server
    python benchmarks/bench_mpm.py --quick              # smoke run, < 20 s
    python benchmarks/bench_mpm.py --seconds 10 --rounds 5 --json out.json

Every server and client process is stopped and reaped before the next run
starts; the benchmark checks that none of its descendants is left at the end.
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import math
import os
import pickle
import platform
import selectors
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import prefork
from prefork import mpm
from prefork.mpm import MPM
from prefork.testing import descendants

try:
    from setproctitle import setproctitle
except ImportError:  # pragma: no cover - a dependency of prefork
    def setproctitle(title: str) -> None:
        pass

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "mpm.json"
TITLE = "bench_mpm"
BASELINE_CHILDREN = 4
PAYLOAD = b"hello prefork\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the server side: one echo handler for every server ----------------------------------------


def echo(conn: socket.socket) -> None:
    """Read one short line, send it back (the caller closes the connection)."""
    data = conn.recv(1024)
    while data and not data.endswith(b"\n"):
        more = conn.recv(1024)
        if not more:
            break
        data += more
    if data:
        conn.sendall(data)


def baseline_child(sock: socket.socket) -> None:
    """A hand-written child: blocking accept, echo, close, forever."""
    while True:
        conn, _ = sock.accept()
        try:
            echo(conn)
        except OSError:
            pass
        finally:
            conn.close()


def mpm_child(sock: socket.socket) -> None:
    """A prefork.MPM child: the same loop, telling the parent when it is busy and idle."""
    busy, idle = mpm.busy, mpm.idle
    while True:
        conn, _ = sock.accept()
        busy()
        try:
            echo(conn)
        except OSError:
            pass
        finally:
            conn.close()
        idle()


def run_baseline(sock: socket.socket, name: str) -> None:
    """The reference: fork K children that accept on the parent's socket; wait for SIGTERM."""
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    kids = []
    for _ in range(BASELINE_CHILDREN):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                setproctitle(f"{name} worker")
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                baseline_child(sock)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        kids.append(pid)
    signal.sigwait(stop)
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in kids:
        os.waitpid(pid, 0)


def mpm_runner(**pool: Any) -> Callable[[socket.socket, str], None]:
    def run(sock: socket.socket, name: str) -> None:
        m = MPM(**pool, overrides={"name": name})
        signal.signal(signal.SIGTERM, lambda signum, frame: m.done())
        try:
            while m.whip_kids(mpm_child, (sock,)):
                pass
        finally:
            m.done()  # children never come back here: they leave through os._exit

    return run


SERVERS: dict[str, tuple[str, Callable[[socket.socket, str], None], int]] = {
    # name: (description, runner, children to wait for before the load starts)
    "baseline": (f"os.fork x{BASELINE_CHILDREN} + blocking accept (hand-written)", run_baseline, BASELINE_CHILDREN),
    "mpm-fixed": (
        "MPM start=4 min_spare=0 max_spare=4 max=4",
        mpm_runner(start_servers=4, min_spare_servers=0, max_spare_servers=4, max_servers=4),
        4,
    ),
    "mpm-spare": (
        "MPM start=2 min_spare=2 max_spare=4 max=8",
        mpm_runner(start_servers=2, min_spare_servers=2, max_spare_servers=4, max_servers=8),
        2,
    ),
}


# -- processes ----------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, cmdline, utime+stime in clock ticks) for every readable process."""
    table: dict[int, tuple[int, str, int]] = {}
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
        table[int(entry)] = (int(rest[1]), cmd, int(rest[11]) + int(rest[12]))
    return table




def server_view(master: int) -> tuple[set[int], set[int], float]:
    """(every descendant, the children serving, CPU seconds used so far by the master and its descendants)."""
    table = _proc_table()
    below = descendants(master, table)
    procs = below | {master}
    workers = {pid for pid in procs if table.get(pid, (0, "", 0))[1].endswith(" worker")}
    ticks = sum(table[pid][2] for pid in procs if pid in table)
    return below, workers, ticks / CLK_TCK


def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat): other load skews a benchmark."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def fork_child() -> int:
    """``os.fork()`` with SIGINT/SIGTERM blocked; the caller records the pid, then calls
    ``unblock()``.  In the child, both are back to their defaults and unblocked."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the benchmark stops us
        unblock()
    return pid


def unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def reap(pid: int, timeout: float) -> bool:
    """Wait for our child ``pid`` to exit; false if it is still running after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


class Server:
    """One server under test, run in a forked process of its own."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        _, runner, self.expected = SERVERS[kind]
        self.name = f"{TITLE}-{kind}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(socket.SOMAXCONN)
        self.port = sock.getsockname()[1]
        self.seen: set[int] = set()
        pid = fork_child()
        if pid == 0:
            code = 0
            try:
                setproctitle(f"{self.name} master")
                runner(sock, self.name)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid
        unblock()
        sock.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as c:
                    c.sendall(PAYLOAD)
                    if c.recv(100) == PAYLOAD and len(self.view()[0]) >= self.expected:
                        return
            except OSError:
                pass
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.pid = 0
                raise RuntimeError(f"{self.kind}: the server exited during start-up (status {status})")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.kind}: not ready after {timeout:g} s")
            time.sleep(0.02)

    def view(self) -> tuple[set[int], float]:
        below, workers, cpu = server_view(self.pid)
        self.seen |= below
        return workers, cpu

    def stop(self) -> None:
        """SIGTERM the master and reap it; then make sure none of its processes survived."""
        if self.pid:
            self.seen |= descendants(self.pid)
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not reap(self.pid, 20):
                print(f"bench_mpm: {self.kind} master {self.pid} ignored SIGTERM; killing it", file=sys.stderr)
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self.pid = 0
        # children are reaped by their own parents; give them a moment, then kill stragglers
        end = time.monotonic() + 5
        while (left := [p for p in self.seen if _alive(p)]) and time.monotonic() < end:
            time.sleep(0.02)
        for p in left:
            print(f"bench_mpm: {self.kind} left process {p} behind; killing it", file=sys.stderr)
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


# -- the load generator -------------------------------------------------------------------------


def client_loop(port: int, conns: int, start_at: float, count_from: float, end_at: float) -> dict[str, Any]:
    """Keep ``conns`` one-request connections in flight until ``end_at`` (monotonic)."""
    addr = (HOST, port)
    sel = selectors.DefaultSelector()
    lat = array.array("q")
    errors: dict[str, int] = {}
    now_ns = time.perf_counter_ns
    mono = time.monotonic
    count_from_ns = now_ns() + int((count_from - mono()) * 1e9)
    end_ns = now_ns() + int((end_at - mono()) * 1e9)

    def failed(what: str, s: socket.socket) -> None:
        errors[what] = errors.get(what, 0) + 1
        try:
            sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()

    def open_one() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        t0 = now_ns()
        err = s.connect_ex(addr)
        if err == 0:
            try:
                s.send(PAYLOAD)
            except OSError as exc:
                failed(errno.errorcode.get(exc.errno or 0, str(exc)), s)
                return
            sel.register(s, selectors.EVENT_READ, [t0, b""])
        elif err == errno.EINPROGRESS:
            sel.register(s, selectors.EVENT_WRITE, [t0, None])
        else:
            failed(errno.errorcode.get(err, str(err)), s)

    while mono() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - mono())))
    for _ in range(conns):
        open_one()
    while True:
        left = end_ns - now_ns()
        if left <= 0:
            break
        for key, _ in sel.select(left / 1e9):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            state = key.data
            if state[1] is None:  # connecting
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    failed(errno.errorcode.get(err, str(err)), s)
                    open_one()
                    continue
                try:
                    s.send(PAYLOAD)
                except OSError as exc:
                    failed(errno.errorcode.get(exc.errno or 0, str(exc)), s)
                    open_one()
                    continue
                state[1] = b""
                sel.modify(s, selectors.EVENT_READ, state)
                continue
            try:
                data = s.recv(256)
            except OSError as exc:
                failed(errno.errorcode.get(exc.errno or 0, str(exc)), s)
                open_one()
                continue
            if not data:
                failed("EOF before the echo", s)
                open_one()
                continue
            state[1] += data
            if len(state[1]) < len(PAYLOAD):
                continue
            t1 = now_ns()
            sel.unregister(s)
            s.close()
            if state[1] != PAYLOAD:
                errors["wrong echo"] = errors.get("wrong echo", 0) + 1
            elif count_from_ns <= t1 <= end_ns:
                lat.append(t1 - state[0])
            open_one()
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return {"latencies": lat.tobytes(), "errors": errors}


class Clients:
    """``n`` forked client processes; results come back through one pipe each."""

    def __init__(self, n: int, port: int, conns: int, start_at: float, count_from: float, end_at: float) -> None:
        self.kids: list[tuple[int, int]] = []
        for _ in range(n):
            r, w = os.pipe()
            pid = fork_child()
            if pid == 0:
                code = 0
                try:
                    os.close(r)
                    setproctitle(f"{TITLE} client")
                    out = pickle.dumps(client_loop(port, conns, start_at, count_from, end_at))
                    with os.fdopen(w, "wb") as f:
                        f.write(out)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            self.kids.append((pid, r))
            unblock()
            os.close(w)

    def collect(self) -> tuple[list[int], dict[str, int]]:
        lat: list[int] = []
        errors: dict[str, int] = {}
        failures = 0
        while self.kids:
            pid, r = self.kids[0]
            with os.fdopen(r, "rb") as f:
                raw = f.read()
            _, status = os.waitpid(pid, 0)
            self.kids.pop(0)
            if not raw or status:
                failures += 1
                continue
            res = pickle.loads(raw)
            part = array.array("q")
            part.frombytes(res["latencies"])
            lat.extend(part)
            for k, v in res["errors"].items():
                errors[k] = errors.get(k, 0) + v
        if failures:
            raise RuntimeError(f"{failures} client process(es) failed")
        return lat, errors

    def kill(self) -> None:
        """Stop the clients still running (after an error or Ctrl-C) and reap them."""
        for pid, r in self.kids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            try:
                os.close(r)
            except OSError:
                pass
        self.kids = []


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    server = Server(kind)
    clients: Clients | None = None
    try:
        server.wait_ready()
        start_at = time.monotonic() + 0.2
        count_from = start_at + args.warmup
        end_at = count_from + args.seconds
        clients = Clients(args.clients, server.port, args.conns, start_at, count_from, end_at)
        time.sleep(max(0.0, count_from - time.monotonic()))
        seen, cpu0 = server.view()
        workers, cpu1 = seen, cpu0
        while (left := end_at - time.monotonic()) > 0:  # a look every 0.25 s: which children served
            time.sleep(min(0.25, left))
            workers, cpu1 = server.view()
            seen |= workers
        lat, errors = clients.collect()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a second Ctrl-C waits for the clean-up
        try:
            if clients is not None:
                clients.kill()
            server.stop()
        finally:
            unblock()
    lat.sort()
    n = len(lat)
    return {
        "requests": n,
        "rps": n / args.seconds,
        "p50_us": percentile(lat, 50) / 1e3,
        "p99_us": percentile(lat, 99) / 1e3,
        "mean_us": (sum(lat) / n / 1e3) if n else float("nan"),
        "server_cpu_us_per_req": (cpu1 - cpu0) / n * 1e6 if n else float("nan"),
        "children_at_end": len(workers),
        "children_seen": len(seen),  # distinct children alive during the window: > at_end when some were replaced
        "errors": errors,
    }


# -- the report -----------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind, rounds in runs.items():
        out[kind] = {
            "description": SERVERS[kind][0],
            "rps": statistics.median(r["rps"] for r in rounds),
            "p50_us": statistics.median(r["p50_us"] for r in rounds),
            "p99_us": statistics.median(r["p99_us"] for r in rounds),
            "server_cpu_us_per_req": statistics.median(r["server_cpu_us_per_req"] for r in rounds),
            "children_at_end": statistics.median(r["children_at_end"] for r in rounds),
            "children_seen": statistics.median(r["children_seen"] for r in rounds),
            "errors": sum(sum(r["errors"].values()) for r in rounds),
            "rounds": rounds,
        }
    base = out.get("baseline", {}).get("rps")
    for entry in out.values():
        entry["ratio_to_baseline"] = entry["rps"] / base if base else None
    return out


def print_table(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(f"bench_mpm: {args.rounds} round(s) x {args.seconds:g} s per server, {args.clients} client processes x "
          f"{args.conns} connections, one request per connection; medians over rounds")
    head = f"{'server':<10} {'requests/s':>11} {'p50 µs':>9} {'p99 µs':>9} {'vs baseline':>11} {'srv CPU/req µs':>15} {'children':>8} {'seen':>5} {'errors':>6}"
    print(head)
    print("-" * len(head))
    for kind, s in summary.items():
        ratio = f"{s['ratio_to_baseline']:.2f}x" if s["ratio_to_baseline"] is not None else "-"
        print(f"{kind:<10} {s['rps']:>11.0f} {s['p50_us']:>9.0f} {s['p99_us']:>9.0f} {ratio:>11} "
              f"{s['server_cpu_us_per_req']:>15.1f} {s['children_at_end']:>8g} {s['children_seen']:>5g} {s['errors']:>6}")
    print()
    for kind, s in summary.items():
        print(f"  {kind:<10} {s['description']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per server and round (default 5; 1 with --quick)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of load before measuring (default 0.5; 0.2 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="rounds, servers interleaved (default 3; 1 with --quick)")
    p.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--conns", type=int, default=4, help="connections in flight per client process (default 4)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {', '.join(SERVERS)}")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true", help="a smoke run: short, one round")
    args = p.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.2 if args.quick else 0.5)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SERVERS]
    if unknown or not kinds or args.rounds < 1 or args.seconds <= 0 or args.clients < 1 or args.conns < 1:
        p.error(f"bad arguments (unknown servers: {unknown})" if unknown else "bad arguments")

    setproctitle(f"{TITLE} main")
    signal.signal(signal.SIGTERM, _interrupted)  # kill <pid> cleans up as Ctrl-C does
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupted)
    busy_before = cpu_busy(0.5)
    if busy_before > 0.25:
        print(f"bench_mpm: warning: the CPUs were {busy_before:.0%} busy before the run; other processes will skew "
              "the numbers", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    t0 = time.monotonic()
    for rnd in range(args.rounds):
        order = kinds[rnd % len(kinds):] + kinds[: rnd % len(kinds)]  # rotate: no server always goes first
        for kind in order:
            try:
                res = run_one(kind, args)  # stops its server and clients whatever happens
            except KeyboardInterrupt:
                left = descendants(os.getpid())
                print(f"bench_mpm: interrupted; processes left behind: {sorted(left) or 'none'}", file=sys.stderr)
                return 130
            runs[kind].append(res)
            errs = f", errors {res['errors']}" if res["errors"] else ""
            print(f"round {rnd + 1}/{args.rounds} {kind:<10} {res['rps']:8.0f} req/s  p50 {res['p50_us']:7.0f} µs  "
                  f"p99 {res['p99_us']:7.0f} µs  srv CPU/req {res['server_cpu_us_per_req']:6.1f} µs  "
                  f"children {res['children_at_end']} (seen {res['children_seen']}){errs}", flush=True)
    summary = summarize(runs)
    print_table(summary, args)

    left = descendants(os.getpid())
    if left:
        print(f"bench_mpm: processes left behind: {sorted(left)}", file=sys.stderr)
    result = {
        "benchmark": "bench_mpm",
        "config": {
            "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds, "clients": args.clients,
            "conns_per_client": args.conns, "payload_bytes": len(PAYLOAD), "quick": args.quick,
            "baseline_children": BASELINE_CHILDREN,
        },
        "machine": {
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "prefork": getattr(prefork, "__version__", None), "cpu_busy_before_run": round(busy_before, 3),
        },
        "elapsed_s": round(time.monotonic() - t0, 2),
        "leftover_processes": sorted(left),
        "servers": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"\nwrote {args.json}")
    return 1 if left else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the first server started
        sys.exit(130)
