"""Scale: memory per queued task, the caller's CPU per task as the pool grows, a lazy map.

    python benchmarks/bench_scale.py                    # all three cases, about 3 minutes on 2 cores
    python benchmarks/bench_scale.py --quick            # a smoke run
    python benchmarks/bench_scale.py --only queued --tasks 200000

Cases (every figure is a median over --rounds (3; lazymap: --map-rounds, 5)
interleaved rounds, each measurement in a fresh interpreter, a child of this
script):

  queued   memory per queued task.  A pool of 2 workers (prefork.Executor, and
           ProcessPoolExecutor with the fork context) is first held: one task
           per worker that waits for a file (_tasks.hold).  Then --tasks
           (1,000,000) no-op tasks are submitted and their futures kept in a
           list; none runs, none is answered.  Measured: this process's VmRSS
           before and after, per task.  VmRSS, not tracemalloc: it is what the
           system charges the caller, C allocations, pymalloc's arenas and the
           allocator's slack included, in every thread; tracemalloc counts only
           what Python asked for, and makes each allocation slower and larger.
           tracemalloc is used for the breakdown alone: the same run at a tenth
           of the tasks, the bytes per task by allocating line.  The list of
           futures (8 bytes a task) is in both pools' figures.  Target: prefork
           at most 0.5x ProcessPoolExecutor's bytes per task.
  cpu      the caller's CPU per task at --workers (2, 8, 32) workers: after
           every worker is up and a warm-up, --cpu-tasks (20,000) no-op tasks
           are submitted one by one, then each result is waited for; three
           times, the median taken.  CPU is getrusage(RUSAGE_SELF): the caller's
           thread and prefork's supervisor thread (the workers are other
           processes); the caller's own share is time.thread_time().  Also, as
           a reference without a target, --seq (2,000) tasks one at a time
           (submit, result, submit...).  Target: CPU per task grows less than
           20 % from the fewest workers to the most.
  lazymap  pool.map(_tasks.noop_arg, range(--items)) (10,000,000) with
           chunksize --chunksize (10,000) and buffersize --buffersize (8: 4
           tasks per worker, at most 80,000 items pending), beside the eager
           map of the same items with the same chunksize and with the default
           chunking (4 chunks per worker).  The items are taken --every
           (500,000) at a time (deque(islice(...))), checking the last one, and
           VmRSS is sampled after each block.  Target: the lazy map's memory
           flat (its largest sample within 10 % of its first, in every round)
           and its speed (items/s, wall time from the call to the last item)
           at least 0.9x the faster eager map's, medians.  Wall time swings
           with the machine's load (the lazy map, a pipeline of some thousand
           round trips, more than an eager map of 8 chunks), so the report also
           gives the ratio of the best rounds and of the caller's CPU per item.

Wall time is skewed by other load on a shared machine; CPU time and memory are
less so.  Read the ratios, which compare pools measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import gc
import itertools
import json
import linecache
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _tasks  # functions the workers import by reference
from _finish import finish

import prefork

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "scale.json"
CASES = ("queued", "cpu", "lazymap")
QUEUED_POOLS = ("prefork", "ProcessPoolExecutor")
MAP_VARIANTS = ("lazy", "eager", "eager_auto")
WORKERS = 2  # queued and lazymap
TARGET_QUEUED = 0.5  # prefork's bytes per queued task, at most this times ProcessPoolExecutor's
TARGET_CPU_GROWTH = 20.0  # %, from the fewest workers to the most
TARGET_MAP_SPEED = 0.9  # the lazy map's items/s, at least this times the faster eager map's
FLAT_PCT = 10.0  # the lazy map's largest RSS sample within this % of its first


def rss_bytes() -> int:
    """This process's resident set (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def process_cpu() -> float:
    """CPU seconds of this process so far, every thread (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_for(what: str, ok: Any, seconds: float) -> None:
    """Poll ``ok()`` until it is true; RuntimeError naming ``what`` after ``seconds``."""
    end = time.monotonic() + seconds
    while not ok():
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not within {seconds:g} s")
        time.sleep(0.005)


# -- queued: memory per queued task -------------------------------------------------------


def make_pool(name: str) -> Any:
    if name == "prefork":
        return prefork.Executor(WORKERS)
    if name == "ProcessPoolExecutor":
        return cf.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork"))
    raise ValueError(f"unknown pool {name!r}; pools: {', '.join(QUEUED_POOLS)}")


def hold_workers(pool: Any, folder: str) -> list[Any]:
    """One _tasks.hold per worker, each submitted once the one before has started
    (so that no worker gets two): every worker is busy until ``folder/go`` exists."""
    gates = []
    for i in range(WORKERS):
        gates.append(pool.submit(_tasks.hold, folder))
        wait_for(f"worker {i + 1} of {WORKERS} held",
                 lambda n=i + 1: sum(f.startswith("started-") for f in os.listdir(folder)) >= n, 60)
    return gates


def child_queued(pool_name: str, tasks: int, trace: bool) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="bench-scale-")
    pool = make_pool(pool_name)
    try:
        pool.submit(_tasks.noop).result()
        gates = hold_workers(pool, folder)
        gc.collect()
        if trace:
            tracemalloc.start()
            first = tracemalloc.take_snapshot()
        before = rss_bytes()
        cpu, wall = process_cpu(), time.perf_counter()
        futures = [pool.submit(_tasks.noop) for _ in range(tasks)]
        cpu, wall = process_cpu() - cpu, time.perf_counter() - wall
        after = rss_bytes()
        out: dict[str, Any] = {"tasks": tasks, "rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20,
                               "bytes_per_task": (after - before) / tasks, "submit_cpu_us": cpu / tasks * 1e6,
                               "submit_wall_s": wall}
        if trace:
            out["breakdown"] = breakdown(first, tracemalloc.take_snapshot(), tasks)
            tracemalloc.stop()
        out["answered"] = sum(f.done() for f in futures)  # 0: none ran, every one was queued
        if out["answered"]:
            raise RuntimeError(f"{pool_name}: {out['answered']} of the tasks were answered while the workers were held")
        del futures, gates
    finally:
        Path(folder, "go").touch()  # the workers are let go; the queued tasks are cancelled at once
        pool.shutdown(wait=True, cancel_futures=True)  # (not wait=False first: ProcessPoolExecutor would not join then)
        shutil.rmtree(folder, ignore_errors=True)
    return out


def breakdown(first: tracemalloc.Snapshot, second: tracemalloc.Snapshot, tasks: int) -> list[dict[str, Any]]:
    """Bytes per task by allocating line (the 12 largest), from two tracemalloc snapshots."""
    rows = []
    for stat in second.compare_to(first, "lineno")[:12]:
        frame = stat.traceback[0]
        rows.append({
            "where": f"{short_path(frame.filename)}:{frame.lineno}",
            "code": linecache.getline(frame.filename, frame.lineno).strip()[:90],
            "bytes_per_task": stat.size_diff / tasks,
            "blocks_per_task": stat.count_diff / tasks,
        })
    return rows


def short_path(filename: str) -> str:
    for prefix in (str(ROOT) + os.sep, os.path.dirname(os.__file__) + os.sep):
        if filename.startswith(prefix):
            return filename[len(prefix):]
    return filename


# -- cpu: the caller's CPU per task as the pool grows ------------------------------------


def child_cpu(workers: int, tasks: int, seq: int) -> dict[str, Any]:
    with prefork.Executor(workers) as pool:
        wait_for(f"{workers} workers up", lambda: (s := pool.stats())["workers"] == workers and not s["booting"], 120)
        warm = [pool.submit(_tasks.noop) for _ in range(64 * workers)]
        for f in warm:
            f.result()
        bulk, seq_runs = [], []
        for _ in range(3):
            gc.collect()
            cpu, own, wall = process_cpu(), time.thread_time(), time.perf_counter()
            futures = [pool.submit(_tasks.noop) for _ in range(tasks)]
            for f in futures:
                f.result()
            bulk.append(((process_cpu() - cpu) / tasks * 1e6, (time.thread_time() - own) / tasks * 1e6,
                         (time.perf_counter() - wall) / tasks * 1e6))
            del futures
            cpu, wall = process_cpu(), time.perf_counter()
            for _ in range(seq):
                pool.submit(_tasks.noop).result()
            seq_runs.append(((process_cpu() - cpu) / seq * 1e6, (time.perf_counter() - wall) / seq * 1e6))
        alive = len(pool.pids())
    return {
        "workers": workers, "alive_at_end": alive, "tasks": tasks, "seq": seq,
        "cpu_us": statistics.median(r[0] for r in bulk), "caller_us": statistics.median(r[1] for r in bulk),
        "wall_us": statistics.median(r[2] for r in bulk),
        "seq_cpu_us": statistics.median(r[0] for r in seq_runs), "seq_wall_us": statistics.median(r[1] for r in seq_runs),
    }


# -- lazymap: a lazy map's memory and speed beside the eager map -------------------------


def child_lazymap(variant: str, items: int, chunksize: int, buffersize: int, every: int) -> dict[str, Any]:
    if variant not in MAP_VARIANTS:
        raise ValueError(f"unknown map variant {variant!r}; variants: {', '.join(MAP_VARIANTS)}")
    options: dict[str, Any] = {}
    if variant != "eager_auto":
        options["chunksize"] = chunksize
    if variant == "lazy":
        options["buffersize"] = buffersize
    with prefork.Executor(WORKERS) as pool:
        list(pool.map(_tasks.noop_arg, range(1000)))  # warm-up: the workers are up
        gc.collect()
        before = rss_bytes()
        cpu, wall = process_cpu(), time.perf_counter()
        results = pool.map(_tasks.noop_arg, range(items), **options)
        samples: list[tuple[int, float]] = []
        done = 0
        while done < items:
            k = min(every, items - done)
            last = collections.deque(itertools.islice(results, k), maxlen=1)
            if not last or last[0] != done + k - 1:
                raise RuntimeError(f"{variant} map: item {done + k - 1} was {last[0] if last else 'missing'}")
            done += k
            samples.append((done, rss_bytes() / 2**20))
        if next(results, None) is not None:
            raise RuntimeError(f"{variant} map: more than {items} items")
        cpu, wall = process_cpu() - cpu, time.perf_counter() - wall
    first = samples[0][1]
    peak = max(r for _, r in samples)
    return {
        "items": items, "options": options, "seconds": wall, "items_per_s": items / wall, "cpu_ns_per_item": cpu / items * 1e9,
        "before_mib": before / 2**20, "first_mib": first, "max_mib": peak, "end_mib": samples[-1][1],
        "growth_pct": (peak - first) / first * 100, "above_before_mib": peak - before / 2**20, "samples": samples,
    }


# -- the parent: rounds of children, medians, the report ----------------------------------


def run_child(args: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON from stdout."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_scale {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def medians(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in runs) for key in keys}


def run_queued(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in QUEUED_POOLS}
    for r in range(args.rounds):
        for name in QUEUED_POOLS:
            runs[name].append(run_child(["--child", "queued", "--pool", name, "--tasks", str(args.tasks)]))
        print(f"queued: round {r + 1} of {args.rounds} done", flush=True)
    pools = {name: {**medians(rs, ("bytes_per_task", "submit_cpu_us", "submit_wall_s", "rss_before_mib",
                                    "rss_after_mib")), "rounds": rs} for name, rs in runs.items()}
    traced = max(1, args.tasks // 10)
    breakdowns = {}
    for name in QUEUED_POOLS:
        breakdowns[name] = run_child(["--child", "queued", "--pool", name, "--tasks", str(traced), "--trace"])["breakdown"]
    ratio = pools["prefork"]["bytes_per_task"] / pools["ProcessPoolExecutor"]["bytes_per_task"]
    return {"tasks": args.tasks, "traced_tasks": traced, "pools": pools, "ratio": ratio, "target": TARGET_QUEUED,
            "met": ratio <= TARGET_QUEUED, "breakdown": breakdowns}


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in args.workers}
    for r in range(args.rounds):
        for w in args.workers:
            runs[w].append(run_child(["--child", "cpu", "--pool-size", str(w), "--cpu-tasks", str(args.cpu_tasks),
                                      "--seq", str(args.seq)]))
        print(f"cpu: round {r + 1} of {args.rounds} done", flush=True)
    sizes = {str(w): {**medians(rs, ("cpu_us", "caller_us", "wall_us", "seq_cpu_us", "seq_wall_us")), "rounds": rs}
             for w, rs in runs.items()}
    low, high = sizes[str(min(args.workers))], sizes[str(max(args.workers))]
    growth = (high["cpu_us"] / low["cpu_us"] - 1) * 100
    return {"tasks": args.cpu_tasks, "seq": args.seq, "workers": list(args.workers), "sizes": sizes,
            "growth_pct": growth, "seq_growth_pct": (high["seq_cpu_us"] / low["seq_cpu_us"] - 1) * 100,
            "target_pct": TARGET_CPU_GROWTH, "met": growth < TARGET_CPU_GROWTH}


def run_lazymap(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in MAP_VARIANTS}
    for r in range(args.map_rounds):
        for variant in MAP_VARIANTS:
            runs[variant].append(run_child(["--child", "lazymap", "--variant", variant, "--items", str(args.items),
                                            "--chunksize", str(args.chunksize), "--buffersize", str(args.buffersize),
                                            "--every", str(args.every)]))
        print(f"lazymap: round {r + 1} of {args.map_rounds} done", flush=True)
    keys = ("seconds", "items_per_s", "cpu_ns_per_item", "before_mib", "first_mib", "max_mib", "end_mib", "growth_pct",
            "above_before_mib")
    variants = {v: {**medians(rs, keys), "options": rs[0]["options"], "rounds": rs} for v, rs in runs.items()}
    best_eager = max(("eager", "eager_auto"), key=lambda v: variants[v]["items_per_s"])
    ratio = variants["lazy"]["items_per_s"] / variants[best_eager]["items_per_s"]
    best = {v: max(r["items_per_s"] for r in rs) for v, rs in runs.items()}
    cpu = {v: m["cpu_ns_per_item"] for v, m in variants.items()}
    flat = max(r["growth_pct"] for r in runs["lazy"]) <= FLAT_PCT  # every round, not the median alone
    return {"items": args.items, "chunksize": args.chunksize, "buffersize": args.buffersize, "every": args.every,
            "rounds": args.map_rounds, "variants": variants, "best_eager": best_eager, "speed_ratio": ratio,
            "best_round_ratio": best["lazy"] / max(best["eager"], best["eager_auto"]),
            "cpu_ratio": min(cpu["eager"], cpu["eager_auto"]) / cpu["lazy"], "flat": flat,
            "target_speed": TARGET_MAP_SPEED, "flat_pct": FLAT_PCT, "met": flat and ratio >= TARGET_MAP_SPEED}


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and one round, for a smoke run")
    p.add_argument("--only", default="", help="comma-separated cases: " + ",".join(CASES))
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; 1 with --quick)")
    p.add_argument("--tasks", type=int, default=None, help="queued: tasks (1,000,000; 20,000 with --quick)")
    p.add_argument("--workers", type=positive_ints, default=[2, 8, 32], help="cpu: pool sizes (2,8,32)")
    p.add_argument("--cpu-tasks", type=int, default=None, help="cpu: tasks per measurement (20,000; 2,000)")
    p.add_argument("--seq", type=int, default=None, help="cpu: sequential round trips (2,000; 200)")
    p.add_argument("--items", type=int, default=None, help="lazymap: items (10,000,000; 200,000)")
    p.add_argument("--map-rounds", type=int, default=None, help="lazymap: interleaved rounds (5; 1 with --quick)")
    p.add_argument("--chunksize", type=int, default=10_000, help="lazymap: items per task (10,000)")
    p.add_argument("--buffersize", type=int, default=8, help="lazymap: tasks pending at most (8)")
    p.add_argument("--every", type=int, default=None, help="lazymap: items between RSS samples (500,000; 20,000)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--pool", choices=QUEUED_POOLS, help=argparse.SUPPRESS)
    p.add_argument("--pool-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=MAP_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.map_rounds = args.map_rounds or (1 if q else 5)
    args.tasks = args.tasks or (20_000 if q else 1_000_000)
    args.cpu_tasks = args.cpu_tasks or (2_000 if q else 20_000)
    args.seq = args.seq or (200 if q else 2_000)
    args.items = args.items or (200_000 if q else 10_000_000)
    args.every = args.every or (20_000 if q else 500_000)
    for name in ("rounds", "map_rounds", "tasks", "cpu_tasks", "seq", "items", "chunksize", "buffersize", "every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.child:
        return child_main(p, args)
    chosen = [c for c in (args.only.split(",") if args.only else CASES) if c]
    for c in chosen:
        if c not in CASES:
            p.error(f"unknown case {c!r} in --only; cases: {', '.join(CASES)}")
    result: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "rounds": args.rounds}
    for case, run in (("queued", run_queued), ("cpu", run_cpu), ("lazymap", run_lazymap)):
        if case in chosen:
            result[case] = run(args)
    return finish(result, args.json, report)


def child_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.child == "queued":
        if args.pool is None:
            p.error("--child queued needs --pool")
        out = child_queued(args.pool, args.tasks, args.trace)
    elif args.child == "cpu":
        if args.pool_size is None or args.pool_size < 1:
            p.error("--child cpu needs --pool-size (positive)")
        out = child_cpu(args.pool_size, args.cpu_tasks, args.seq)
    else:
        if args.variant is None:
            p.error("--child lazymap needs --variant")
        out = child_lazymap(args.variant, args.items, args.chunksize, args.buffersize, args.every)
    print(json.dumps(out))
    return 0


def report(result: dict[str, Any]) -> None:
    yes = {True: "met", False: "NOT met"}
    if "queued" in result:
        r = result["queued"]
        print(f"\nqueued: {r['tasks']:,} no-op tasks submitted while both workers are held; the caller's VmRSS growth")
        print(f"{'pool':<22}{'bytes/task':>12}{'RSS before':>12}{'after MiB':>11}{'submit CPU µs/task':>20}")
        for name, m in r["pools"].items():
            print(f"{name:<22}{m['bytes_per_task']:>12,.0f}{m['rss_before_mib']:>12.1f}{m['rss_after_mib']:>11.1f}"
                  f"{m['submit_cpu_us']:>20.1f}")
        print(f"prefork/ProcessPoolExecutor: {r['ratio']:.2f}x (target <= {r['target']}x): {yes[r['met']]}")
        for name, rows in r["breakdown"].items():
            print(f"\n  {name}, tracemalloc at {r['traced_tasks']:,} tasks, bytes per task by line:")
            for row in rows:
                print(f"  {row['bytes_per_task']:>8.1f} B {row['blocks_per_task']:>5.2f} blocks  {row['where']}  {row['code']}")
    if "cpu" in result:
        r = result["cpu"]
        print(f"\ncpu: {r['tasks']:,} no-op tasks submitted one by one, then waited for; the caller process's CPU "
              f"(getrusage) per task, µs; 'seq': {r['seq']:,} one at a time")
        print(f"{'workers':>8}{'CPU/task':>10}{'caller':>8}{'wall':>8}{'seq CPU':>9}{'seq wall':>10}")
        for w, m in r["sizes"].items():
            print(f"{w:>8}{m['cpu_us']:>10.2f}{m['caller_us']:>8.2f}{m['wall_us']:>8.2f}{m['seq_cpu_us']:>9.1f}"
                  f"{m['seq_wall_us']:>10.1f}")
        print(f"growth {min(r['workers'])} -> {max(r['workers'])} workers: {r['growth_pct']:+.1f} % "
              f"(target < {r['target_pct']:g} %): {yes[r['met']]}; one at a time: {r['seq_growth_pct']:+.1f} %")
    if "lazymap" in result:
        r = result["lazymap"]
        print(f"\nlazymap: map(noop_arg, range({r['items']:,})), items taken {r['every']:,} at a time; "
              f"the caller's VmRSS in MiB")
        print(f"{'variant':<12}{'options':<34}{'items/s':>12}{'CPU ns/item':>12}{'before':>8}{'first':>8}"
              f"{'max':>8}{'end':>8}{'growth':>8}")
        for v, m in r["variants"].items():
            opts = ", ".join(f"{k}={val}" for k, val in m["options"].items()) or "default chunks"
            print(f"{v:<12}{opts:<34}{m['items_per_s']:>12,.0f}{m['cpu_ns_per_item']:>12.0f}{m['before_mib']:>8.1f}"
                  f"{m['first_mib']:>8.1f}{m['max_mib']:>8.1f}{m['end_mib']:>8.1f}{m['growth_pct']:>7.1f}%")
        print(f"lazy/faster eager, items/s: medians {r['speed_ratio']:.2f}x, best rounds {r['best_round_ratio']:.2f}x; "
              f"the caller's CPU per item: {r['cpu_ratio']:.2f}x (> 1: the lazy map spends less)")
        print(f"lazy/{r['best_eager']}: {r['speed_ratio']:.2f}x (target >= {r['target_speed']}x); memory flat "
              f"(max within {r['flat_pct']:g} % of the first sample, every round): {'yes' if r['flat'] else 'no'}: "
              f"{yes[r['met']]}")


if __name__ == "__main__":
    sys.exit(main())
