"""prefork.Executor beside the process pools people use today, in one run.

    python benchmarks/bench_executor.py                 # every case, 5 rounds
    python benchmarks/bench_executor.py --quick         # a smoke run
    python benchmarks/bench_executor.py --only submit,roundtrip --rounds 3

Cases (2 workers everywhere):
  submit     N no-op tasks submitted one by one, then waited for   tasks/s, higher is better
  map        M no-op tasks through the pool's bulk map, chunked     tasks/s, higher is better
  map_auto   50,000 no-op tasks through the bulk map, chunk size    tasks/s, higher is better
             left to the pool (what a user gets by default)
  payload    200 tasks, each sent a 1 MiB bytes, returning its len  MiB/s sent, higher is better
  roundtrip  one no-op task at a time, submit to result             p50 and p99 in µs, lower is better
  start      creating the pool until the first result is back       ms, lower is better
  shutdown   shutting down a pool whose workers are idle            ms, lower is better
  cpu        200 tasks of 10 ms of CPU each                         % of the ideal, higher is better

map_auto runs fewer tasks than map: ProcessPoolExecutor, loky and pebble
default to one item per task, about 10,000 tasks/s here, and 200,000 such
tasks would take 20 s per pool and round.

Within a round every pool runs every case, the order of the pools rotating
from round to round; the table shows medians over the rounds and each
pool's ratio to the best peer (prefork is not a peer of itself).  Peers that
are not installed (loky, pebble, mpire, billiard) are skipped with a note:
``pip install -r benchmarks/requirements.txt`` brings them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# _tasks: functions every pool pickles by reference; prefork is imported before any
# timing starts, as the peers are
import _tasks

import prefork

WORKERS = 2
HIGHER_IS_BETTER = {"submit": True, "map": True, "map_auto": True, "payload": True, "roundtrip_p50": False,
                    "roundtrip_p99": False, "start": False, "shutdown": False, "cpu": True}
UNITS = {"submit": "tasks/s", "map": "tasks/s", "map_auto": "tasks/s", "payload": "MiB/s", "roundtrip_p50": "µs",
         "roundtrip_p99": "µs", "start": "ms", "shutdown": "ms", "cpu": "% ideal"}
PAYLOAD = 1 << 20  # bytes sent with each task of the payload case


class Adapter:
    """One pool behind the same five operations.

    ``map`` with ``chunksize=None`` calls the pool's map without a chunk size: its default.
    """

    name = "?"

    def start(self) -> None: ...
    def submit_all(self, fn: Callable[..., Any], argss: list[tuple[Any, ...]]) -> list[Any]: ...
    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int | None) -> list[Any]: ...
    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def stop(self) -> None: ...


class MPPoolAdapter(Adapter):
    name = "mp.Pool"

    def start(self) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(WORKERS)

    def submit_all(self, fn, argss):  # type: ignore[no-untyped-def]
        results = [self.pool.apply_async(fn, a) for a in argss]
        return [r.get() for r in results]

    def map(self, fn, items, chunksize):  # type: ignore[no-untyped-def]
        if chunksize is None:
            return self.pool.map(fn, items)
        return self.pool.map(fn, items, chunksize=chunksize)

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        return self.pool.apply(fn, args)

    def stop(self) -> None:
        self.pool.close()
        self.pool.join()


class FuturesAdapter(Adapter):
    """Any concurrent.futures-style executor: ProcessPoolExecutor, loky, pebble's futures."""

    def __init__(self, name: str, factory: Callable[[], Any]) -> None:
        self.name = name
        self.factory = factory

    def start(self) -> None:
        self.pool = self.factory()

    def submit_all(self, fn, argss):  # type: ignore[no-untyped-def]
        futures = [self.pool.submit(fn, *a) for a in argss]
        return [f.result() for f in futures]

    def map(self, fn, items, chunksize):  # type: ignore[no-untyped-def]
        if chunksize is None:
            return list(self.pool.map(fn, items))
        return list(self.pool.map(fn, items, chunksize=chunksize))

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        return self.pool.submit(fn, *args).result()

    def stop(self) -> None:
        self.pool.shutdown(wait=True)


class PebbleAdapter(Adapter):
    name = "pebble"

    def start(self) -> None:
        import pebble

        self.pool = pebble.ProcessPool(max_workers=WORKERS, context=multiprocessing.get_context("fork"))

    def submit_all(self, fn, argss):  # type: ignore[no-untyped-def]
        futures = [self.pool.schedule(fn, args=a) for a in argss]
        return [f.result() for f in futures]

    def map(self, fn, items, chunksize):  # type: ignore[no-untyped-def]
        if chunksize is None:
            return list(self.pool.map(fn, items).result())
        return list(self.pool.map(fn, items, chunksize=chunksize).result())

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        return self.pool.schedule(fn, args=args).result()

    def stop(self) -> None:
        self.pool.close()
        self.pool.join()


class MpireAdapter(Adapter):
    name = "mpire"

    def start(self) -> None:
        import mpire

        self.pool = mpire.WorkerPool(n_jobs=WORKERS, start_method="fork", keep_alive=True)
        self.pool.__enter__()

    def submit_all(self, fn, argss):  # type: ignore[no-untyped-def]
        results = [self.pool.apply_async(fn, a) for a in argss]
        return [r.get() for r in results]

    def map(self, fn, items, chunksize):  # type: ignore[no-untyped-def]
        if chunksize is None:
            return self.pool.map(fn, items, progress_bar=False)
        return self.pool.map(fn, items, chunk_size=chunksize, progress_bar=False)

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        return self.pool.apply(fn, args)

    def stop(self) -> None:
        self.pool.__exit__(None, None, None)


class BilliardAdapter(MPPoolAdapter):
    name = "billiard"

    def start(self) -> None:
        import billiard

        self.pool = billiard.Pool(WORKERS)


def adapters() -> list[Adapter]:
    found: list[Adapter] = [
        FuturesAdapter("prefork", lambda: prefork.Executor(WORKERS)),
        MPPoolAdapter(),
        FuturesAdapter("ProcessPoolExecutor", lambda: cf.ProcessPoolExecutor(
            WORKERS, mp_context=multiprocessing.get_context("fork"))),
    ]
    optional: list[tuple[str, Callable[[], Adapter]]] = [
        ("loky", lambda: FuturesAdapter("loky", lambda: __import__("loky").ProcessPoolExecutor(WORKERS))),
        ("pebble", PebbleAdapter),
        ("mpire", MpireAdapter),
        ("billiard", BilliardAdapter),
    ]
    for module, make in optional:
        try:
            __import__(module)
        except ImportError:
            print(f"note: {module} is not installed; skipped (pip install -r benchmarks/requirements.txt)")
            continue
        found.append(make())
    return found


# -- the cases ----------------------------------------------------------------------------


def case_submit(a: Adapter, n: int) -> dict[str, float]:
    a.start()
    try:
        a.call(_tasks.noop)
        t = time.perf_counter()
        out = a.submit_all(_tasks.noop_arg, [(i,) for i in range(n)])
        elapsed = time.perf_counter() - t
        assert out == list(range(n))
        return {"submit": n / elapsed}
    finally:
        a.stop()


def _timed_map(a: Adapter, n: int, chunksize: int | None) -> float:
    """tasks/s of one bulk map of ``n`` no-op tasks (``chunksize=None``: the pool's default)."""
    a.start()
    try:
        a.call(_tasks.noop)
        t = time.perf_counter()
        out = a.map(_tasks.noop_arg, list(range(n)), chunksize)
        elapsed = time.perf_counter() - t
        assert list(out) == list(range(n))
        return n / elapsed
    finally:
        a.stop()


def case_map(a: Adapter, n: int) -> dict[str, float]:
    return {"map": _timed_map(a, n, max(1, n // (WORKERS * 40)))}


def case_map_auto(a: Adapter, n: int) -> dict[str, float]:
    return {"map_auto": _timed_map(a, n, None)}


def case_payload(a: Adapter, n: int) -> dict[str, float]:
    blob = os.urandom(PAYLOAD)
    a.start()
    try:
        a.call(_tasks.noop)
        t = time.perf_counter()
        out = a.submit_all(_tasks.length, [(blob,)] * n)
        elapsed = time.perf_counter() - t
        assert out == [PAYLOAD] * n
        return {"payload": n * PAYLOAD / (1 << 20) / elapsed}
    finally:
        a.stop()


def case_roundtrip(a: Adapter, n: int) -> dict[str, float]:
    a.start()
    try:
        for _ in range(50):
            a.call(_tasks.noop)
        samples = []
        for _ in range(n):
            t = time.perf_counter_ns()
            a.call(_tasks.noop)
            samples.append((time.perf_counter_ns() - t) / 1000)
        samples.sort()
        return {"roundtrip_p50": samples[len(samples) // 2], "roundtrip_p99": samples[int(len(samples) * 0.99)]}
    finally:
        a.stop()


def case_start_shutdown(a: Adapter, n: int) -> dict[str, float]:
    t = time.perf_counter()
    a.start()
    a.call(_tasks.noop)
    started = time.perf_counter() - t
    for _ in range(WORKERS * 4):  # every worker up and idle
        a.call(_tasks.noop)
    t = time.perf_counter()
    a.stop()
    return {"start": started * 1000, "shutdown": (time.perf_counter() - t) * 1000}


def case_cpu(a: Adapter, n: int) -> dict[str, float]:
    a.start()
    try:
        a.call(_tasks.noop)
        work = _tasks.calibrate(0.010)
        t = time.perf_counter()
        used = a.submit_all(_tasks.burn_timed, [(work,)] * n)
        elapsed = time.perf_counter() - t
        # the ideal: the CPU time the tasks took in the workers, spread evenly over them
        # (measured, not calibrated here: a worker may run at another speed than this process)
        ideal = sum(used) / WORKERS
        return {"cpu": 100 * ideal / elapsed}
    finally:
        a.stop()


def socketpair_floor(n: int) -> float:
    """p50 in µs of a one-byte round trip through a socketpair between this process
    and a child, each pinned to its own core when there are two: the floor under
    any pool's round trip on this machine, measured in the same run."""
    import socket

    a, b = socket.socketpair()
    cpus = sorted(os.sched_getaffinity(0))
    pid = os.fork()
    if pid == 0:
        a.close()
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[1]})
        while True:
            data = b.recv(64)
            if not data:
                os._exit(0)
            b.send(data)
    b.close()
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        for _ in range(100):
            a.send(b"x")
            a.recv(64)
        samples = []
        for _ in range(n):
            t = time.perf_counter_ns()
            a.send(b"x")
            a.recv(64)
            samples.append((time.perf_counter_ns() - t) / 1000)
    finally:
        a.close()
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, set(cpus))
    samples.sort()
    return samples[len(samples) // 2]


CASES: dict[str, Callable[[Adapter, int], dict[str, float]]] = {
    "submit": case_submit,
    "map": case_map,
    "map_auto": case_map_auto,
    "payload": case_payload,
    "roundtrip": case_roundtrip,
    "start": case_start_shutdown,
    "cpu": case_cpu,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--only", default="", help="comma-separated cases: " + ",".join(CASES))
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "executor.json"))
    args = p.parse_args(argv)
    sizes = {"submit": 20_000, "map": 200_000, "map_auto": 50_000, "payload": 200, "roundtrip": 2_000, "start": 1,
             "cpu": 200}
    if args.quick:
        sizes = {"submit": 2_000, "map": 20_000, "map_auto": 5_000, "payload": 20, "roundtrip": 200, "start": 1,
                 "cpu": 20}
    chosen = [c for c in (args.only.split(",") if args.only else CASES) if c]
    for c in chosen:
        if c not in CASES:
            p.error(f"unknown case {c!r}; cases: {', '.join(CASES)}")
    pools = adapters()
    runs: dict[str, dict[str, list[float]]] = {a.name: {} for a in pools}
    floors: list[float] = []
    for r in range(args.rounds):
        if "roundtrip" in chosen:
            floors.append(socketpair_floor(sizes["roundtrip"]))
        order = pools[r % len(pools):] + pools[: r % len(pools)]
        for case in chosen:
            for a in order:
                for metric, value in CASES[case](a, sizes[case]).items():
                    runs[a.name].setdefault(metric, []).append(value)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    medians = {name: {m: statistics.median(v) for m, v in metrics.items()} for name, metrics in runs.items()}
    report(medians)
    floor = statistics.median(floors) if floors else None
    if floor is not None:
        print(f"socketpair round trip between two cores (the floor), p50: {floor:.1f} µs")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "workers": WORKERS, "rounds": args.rounds, "sizes": {c: sizes[c] for c in chosen},
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "medians": medians, "runs": runs,
        "floor_us": floor, "floor_runs": floors,
    }, indent=2))
    print(f"\nJSON: {out}")
    return 0


def report(medians: dict[str, dict[str, float]]) -> None:
    names = list(medians)
    metrics = [m for m in HIGHER_IS_BETTER if any(m in medians[n] for n in names)]
    width = max(12, *(len(n) for n in names)) + 1  # a space between the names, the longest too
    labels = {m: f"{m} ({UNITS[m]})" for m in metrics}
    lw = max([16, *(len(label) for label in labels.values())])
    print("\n" + f"{'medians':<{lw}}" + "".join(f"{n:>{width}}" for n in names) + f"{'prefork/best peer':>20}")
    for m in metrics:
        row = [medians[n].get(m, float("nan")) for n in names]
        peers = [v for n, v in zip(names, row, strict=True) if n != "prefork" and v == v]
        best = (max(peers) if HIGHER_IS_BETTER[m] else min(peers)) if peers else float("nan")
        ours = medians["prefork"].get(m, float("nan"))
        ratio = (ours / best if HIGHER_IS_BETTER[m] else best / ours) if best == best and ours else float("nan")
        print(f"{labels[m]:<{lw}}" + "".join(f"{v:>{width},.1f}" for v in row) + f"{ratio:>19.2f}x")
    print("\nratio > 1: prefork is better than the best peer (for times and latencies: faster)")


if __name__ == "__main__":
    sys.exit(main())
