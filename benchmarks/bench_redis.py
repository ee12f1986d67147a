"""Through Redis: prefork-redis beside rq, arq and taskiq-redis; hosts; round trips and their floor.

    python benchmarks/bench_redis.py             # about 3 minutes on 2 cores
    python benchmarks/bench_redis.py --quick     # a smoke run

Needs ``redis-server`` (Debian's package) and the plugin
(``pip install ./plugins/prefork-redis``); the peers come from
``benchmarks/requirements.txt`` (one not installed is skipped with a note).
One server is started on a free loopback port in a temporary folder, and
stopped at the end: every system runs on it, each with its own keys.  A
prefork-redis host is a ``prefork run`` process (``app = "prefork_redis:serve"``,
signed tasks); the peers' workers are started as described in ``_redis_peers.py``;
the clients run in this process.

  throughput  --tasks no-op tasks submitted at once, then each result waited
              for, one host of --workers workers: tasks/s, prefork-redis and
              each peer (its own --workers worker processes)
  hosts       the same with 1 and 2 hosts of 1 worker each: tasks/s, and with
              tasks that sleep 2 ms (the hosts' own parallelism, where the
              2 cores are not all taken by the no-op tasks' overhead)
  latency     --trips sequential tasks, submit to result (the throughput case's
              host and workers): p50 and p99 in ms, prefork-redis and the peers
              (--peer-trips each; arq and taskiq-redis poll every 10 ms)
  floor       the round trip's parts without prefork-redis: a task through Redis
              between two bare processes (XADD, then XREAD BLOCK on each side),
              and a prefork pool's own round trip (submit to result, in process)

Every round runs every case, each system in turn (the order rotates from round
to round), and the medians of --rounds rounds are printed with the ratios that
matter: prefork-redis over the best peer, 2 hosts over 1.  JSON goes to --json.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _redis_peers import PEERS, Peer  # noqa: E402

PREFORK = "prefork-redis"
SLEEP_S = 0.002  # the I/O-bound task of the hosts case


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("bench_redis: redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("bench_redis: redis-server did not start") from None
            time.sleep(0.02)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def start_hosts(n: int, url: str, app: str, workdir: Path, workers: int = 1) -> list[subprocess.Popen[bytes]]:
    hosts = []
    for i in range(n):
        config = workdir / f"{app}-host{i}.toml"
        config.write_text(
            f'name = "bench-host{i}"\napp = "prefork_redis:serve"\nplugins = ["prefork_redis"]\n'
            f'[scaling]\nname = "fixed"\nworkers = {workers}\n'
            f'[transport]\nname = "redis"\nurl = "{url}"\nstream = "{app}"\nblock_ms = 100\n'
            '[resolver]\nname = "allow"\nallow = ["operator:add", "time:sleep"]\n'
        )
        hosts.append(subprocess.Popen(
            [sys.executable, "-m", "prefork", "run", "--config", str(config)], cwd=workdir,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    return hosts


def stop_hosts(hosts: list[subprocess.Popen[bytes]]) -> None:
    for proc in hosts:
        proc.terminate()
    for proc in hosts:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def throughput(url: str, app: str, tasks: int, sleep: float = 0.0) -> float:
    from prefork_redis import Client

    with Client(url, app) as client:
        client.submit("operator:add", 0, 0).result(timeout=60)  # every host up
        start = time.perf_counter()
        if sleep:
            futures = [client.submit("time:sleep", sleep) for _ in range(tasks)]
            assert [f.result(timeout=120) for f in futures] == [None] * tasks
        else:
            futures = [client.submit("operator:add", i, 1) for i in range(tasks)]
            assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(tasks)]
        return tasks / (time.perf_counter() - start)


def latency(url: str, app: str, trips: int) -> list[float]:
    from prefork_redis import Client

    with Client(url, app) as client:
        client.submit("operator:add", 0, 0).result(timeout=60)
        samples = []
        for i in range(trips):
            start = time.perf_counter()
            client.submit("operator:add", i, 1).result(timeout=60)
            samples.append((time.perf_counter() - start) * 1000)
    return samples


_ECHO = r"""
import sys, redis
r = redis.Redis.from_url(sys.argv[1], single_connection_client=True)
last = "$"
while True:
    reply = r.xread({sys.argv[2] + ":in": last}, count=1, block=5000)
    if reply:
        last, fields = reply[0][1][0]
        if b"stop" in fields:
            break
        r.xadd(sys.argv[2] + ":out", fields)
"""


def redis_floor(url: str, trips: int) -> list[float]:
    """A message through Redis to a bare process and back (XADD, XREAD BLOCK on both sides): ms each."""
    import redis

    key = f"floor{uuid.uuid4().hex[:8]}"
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, url, key])
    client: Any = redis.Redis.from_url(url, single_connection_client=True)
    try:
        last = client.xadd(f"{key}:out", {"v": "start"})
        deadline = time.monotonic() + 30
        while True:  # until the echo process answers
            client.xadd(f"{key}:in", {"v": "ping"})
            reply = client.xread({f"{key}:out": last}, count=1, block=200)
            if reply:
                last = reply[0][1][0][0]
                break
            if time.monotonic() > deadline:
                raise SystemExit("bench_redis: the floor's echo process did not answer")
        samples = []
        for i in range(trips):
            start = time.perf_counter()
            client.xadd(f"{key}:in", {"v": str(i)})
            reply = client.xread({f"{key}:out": last}, count=1, block=5000)
            last = reply[0][1][0][0]
            samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        client.xadd(f"{key}:in", {"stop": "1"})
        echo.wait(10)
        client.delete(f"{key}:in", f"{key}:out")
        client.close()


def pool_floor(workers: int, trips: int) -> list[float]:
    """A prefork pool's own round trip, in this process (what a host adds to Redis's): ms each."""
    import prefork

    with prefork.Executor(workers) as pool:
        pool.submit(operator.add, 0, 0).result()
        samples = []
        for i in range(trips):
            start = time.perf_counter()
            pool.submit(operator.add, i, 1).result()
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Round:
    """One round of every case; each measurement appended to ``runs[name]``."""

    def __init__(self, args: argparse.Namespace, url: str, workdir: Path, peers: list[type[Peer]], index: int) -> None:
        self.args, self.url, self.workdir, self.peers, self.index = args, url, workdir, peers, index
        self.runs: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.runs.setdefault(name, []).append(value)

    def rotated(self, items: list[Any]) -> list[Any]:
        k = self.index % len(items)
        return items[k:] + items[:k]

    def run(self) -> None:
        a = self.args
        systems: list[Callable[[], None]] = [self.prefork_case, *(lambda p=p: self.peer_case(p) for p in self.peers)]
        for case in self.rotated(systems):
            case()
        for n in self.rotated([1, 2]):
            app = f"bench{uuid.uuid4().hex[:8]}"
            hosts = start_hosts(n, self.url, app, self.workdir, workers=1)
            try:
                self.add(f"hosts: tasks/s, {n} host(s) x 1 worker, no-op", throughput(self.url, app, a.tasks))
                self.add(f"hosts: tasks/s, {n} host(s) x 1 worker, 2 ms sleep",
                         throughput(self.url, app, a.sleep_tasks, sleep=SLEEP_S))  # fmt: skip
            finally:
                stop_hosts(hosts)
        self.add("floor: Redis round trip between two bare processes, p50 ms", _p(redis_floor(self.url, a.trips), 0.5))
        self.add(f"floor: prefork pool round trip ({a.workers} workers), p50 ms", _p(pool_floor(a.workers, a.trips), 0.5))

    def prefork_case(self) -> None:
        a = self.args
        app = f"bench{uuid.uuid4().hex[:8]}"
        hosts = start_hosts(1, self.url, app, self.workdir, workers=a.workers)
        try:
            self.add(f"throughput: tasks/s, {PREFORK}", throughput(self.url, app, a.tasks))
            samples = latency(self.url, app, a.trips)
            self.add(f"latency: p50 ms, {PREFORK}", _p(samples, 0.5))
            self.add(f"latency: p99 ms, {PREFORK}", _p(samples, 0.99))
        finally:
            stop_hosts(hosts)

    def peer_case(self, cls: type[Peer]) -> None:
        a = self.args
        peer = cls(self.url, f"bench{uuid.uuid4().hex[:8]}", a.workers)
        peer.start(self.workdir)
        try:
            self.add(f"throughput: tasks/s, {cls.name}", peer.throughput(a.tasks))
            samples = peer.latency(a.peer_trips)
            self.add(f"latency: p50 ms, {cls.name}", _p(samples, 0.5))
        finally:
            peer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=3000, help="no-op tasks per throughput measurement")
    p.add_argument("--sleep-tasks", type=int, default=1000, help="2 ms tasks per measurement of the hosts case")
    p.add_argument("--trips", type=int, default=500, help="sequential round trips of prefork-redis and the floors")
    p.add_argument("--peer-trips", type=int, default=100, help="sequential round trips of each peer")
    p.add_argument("--workers", type=int, default=4, help="workers of the throughput case, for every system")
    p.add_argument("--peers", default=",".join(c.name for c in PEERS), help="which peers (default: all installed)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=str(HERE / "results" / "redis.json"))
    args = p.parse_args(argv)
    # hosts and clients need one HMAC key (prefork-redis refuses unsigned tasks); the hosts inherit it
    os.environ.setdefault("PREFORK_REDIS_SECRET", secrets.token_hex(32))
    if args.quick:
        args.rounds, args.tasks, args.sleep_tasks, args.trips, args.peer_trips = 1, 300, 100, 50, 10
    wanted = {name.strip() for name in args.peers.split(",") if name.strip()}
    peers = [c for c in PEERS if c.name in wanted and c.installed()]
    for c in PEERS:
        if c.name in wanted and not c.installed():
            print(f"note: {c.name} is not installed (pip install -r benchmarks/requirements.txt): skipped")
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server, url = start_redis(workdir)
        try:
            for index in range(args.rounds):
                one = Round(args, url, workdir, peers, index)
                one.run()
                for key, values in one.runs.items():
                    runs.setdefault(key, []).extend(values)
                print(f"round {index + 1}/{args.rounds}: " + ", ".join(
                    f"{k.split(': ', 1)[1]} {v[-1]:,.1f}" for k, v in one.runs.items() if k.startswith("throughput")
                ), flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait(10)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    medians.update(ratios(medians, args.workers))
    print(f"\nthrough Redis, {args.rounds} round(s), medians; {args.workers} workers per system in the throughput "
          "and latency cases")  # fmt: skip
    for key, value in medians.items():
        print(f"  {key:<78}{value:>12,.2f}")
    print("\nhow each system's workers were started:")
    print(f"  {PREFORK}: prefork run (app = \"prefork_redis:serve\"), [scaling] fixed, {args.workers} workers")
    for c in peers:
        print(f"  {c.name}: {c(url, 'q', args.workers).how}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "rounds": args.rounds, "tasks": args.tasks, "trips": args.trips, "workers": args.workers,
        "peers": {c.name: c(url, "q", args.workers).how for c in peers}, "medians": medians, "runs": runs,
    }, indent=2))  # fmt: skip
    print(f"\nJSON: {out}")
    return 0


def ratios(medians: dict[str, float], workers: int) -> dict[str, float]:
    """The targets' ratios, from the medians (each a ratio of medians of one run)."""
    out: dict[str, float] = {}
    ours = medians.get(f"throughput: tasks/s, {PREFORK}")
    peers = {k.split(", ", 1)[1]: v for k, v in medians.items() if k.startswith("throughput") and PREFORK not in k}
    if ours and peers:
        best = max(peers, key=lambda name: peers[name])
        out[f"ratio: throughput, {PREFORK} / the best peer ({best})"] = ours / peers[best]
    for what in ("no-op", "2 ms sleep"):
        one = medians.get(f"hosts: tasks/s, 1 host(s) x 1 worker, {what}")
        two = medians.get(f"hosts: tasks/s, 2 host(s) x 1 worker, {what}")
        if one and two:
            out[f"ratio: 2 hosts / 1 host, {what}"] = two / one
    p50 = medians.get(f"latency: p50 ms, {PREFORK}")
    floor = medians.get("floor: Redis round trip between two bare processes, p50 ms", 0.0) + medians.get(
        f"floor: prefork pool round trip ({workers} workers), p50 ms", 0.0
    )
    if p50 and floor:
        out[f"ratio: latency p50, {PREFORK} / (Redis floor + pool floor)"] = p50 / floor
    return out


if __name__ == "__main__":
    sys.exit(main())
