"""Through Redis: tasks/s with 1, 2 and 4 supervisors, and end-to-end latency.

    python benchmarks/bench_redis.py             # about a minute on 2 cores
    python benchmarks/bench_redis.py --quick     # a smoke run

Needs ``redis-server`` (Debian's package) and the plugin
(``pip install ./plugins/prefork-redis``).  A server is started on a free
loopback port in a temporary folder and stopped at the end.  Each supervisor
is a ``prefork run`` process (``app = "prefork_redis:serve"``) with 1 worker,
as one host would be; the client is this process.

  throughput  --tasks no-op tasks (operator:add) submitted at once, then waited for: tasks/s
  latency     --trips sequential tasks, submit to result: p50 and p99 in ms (1 supervisor)

Rounds are repeated (--rounds) and the medians printed; JSON goes to --json.
"""

from __future__ import annotations

import argparse
import json
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


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


def start_hosts(n: int, url: str, app: str, workdir: Path) -> list[subprocess.Popen[bytes]]:
    hosts = []
    for i in range(n):
        config = workdir / f"{app}-host{i}.toml"
        config.write_text(
            f'name = "bench-host{i}"\napp = "prefork_redis:serve"\nplugins = ["prefork_redis"]\n'
            '[scaling]\nname = "fixed"\nworkers = 1\n'
            f'[transport]\nname = "redis"\nurl = "{url}"\nstream = "{app}"\nblock_ms = 100\n'
            '[resolver]\nname = "allow"\nallow = ["operator:add"]\n'
        )
        hosts.append(subprocess.Popen([sys.executable, "-m", "prefork", "run", "--config", str(config)], cwd=workdir))
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


def throughput(url: str, app: str, tasks: int) -> float:
    from prefork_redis import Client

    with Client(url, app) as client:
        client.submit("operator:add", 0, 0).result(timeout=60)  # every host up
        t = time.perf_counter()
        futures = [client.submit("operator:add", i, 1) for i in range(tasks)]
        assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(tasks)]
        return tasks / (time.perf_counter() - t)


def latency(url: str, app: str, trips: int) -> tuple[float, float]:
    from prefork_redis import Client

    with Client(url, app) as client:
        client.submit("operator:add", 0, 0).result(timeout=60)
        samples = []
        for i in range(trips):
            t = time.perf_counter()
            client.submit("operator:add", i, 1).result(timeout=60)
            samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--trips", type=int, default=500)
    p.add_argument("--supervisors", default="1,2,4")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=str(HERE / "results" / "redis.json"))
    args = p.parse_args(argv)
    # hosts and clients need one HMAC key (prefork-redis refuses unsigned tasks); the hosts inherit it
    os.environ.setdefault("PREFORK_REDIS_SECRET", secrets.token_hex(32))
    if args.quick:
        args.rounds, args.tasks, args.trips, args.supervisors = 1, 200, 50, "1,2"
    counts = [int(n) for n in args.supervisors.split(",")]
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server, url = start_redis(workdir)
        try:
            for _ in range(args.rounds):
                for n in counts:
                    app = f"bench{uuid.uuid4().hex[:8]}"
                    hosts = start_hosts(n, url, app, workdir)
                    try:
                        runs.setdefault(f"tasks/s, {n} supervisor(s)", []).append(throughput(url, app, args.tasks))
                        if n == counts[0]:
                            p50, p99 = latency(url, app, args.trips)
                            runs.setdefault("latency p50 ms", []).append(p50)
                            runs.setdefault("latency p99 ms", []).append(p99)
                    finally:
                        stop_hosts(hosts)
        finally:
            server.terminate()
            server.wait(10)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\nthrough Redis, {args.rounds} round(s), medians (each supervisor: `prefork run`, 1 worker)")
    for key, value in medians.items():
        print(f"  {key:<28}{value:>12,.1f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "tasks": args.tasks, "trips": args.trips,
                               "medians": medians, "runs": runs}, indent=2))  # fmt: skip
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
