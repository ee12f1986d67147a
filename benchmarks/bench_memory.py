"""Memory: the supervisor's RSS over a long run, and what a worker shares with its parent.

    python benchmarks/bench_memory.py                   # both cases, under a minute on 2 cores
    python benchmarks/bench_memory.py --quick           # a smoke run
    python benchmarks/bench_memory.py --only fork --mb 400

Cases (2 workers everywhere):
  supervisor  prefork.Executor runs --tasks (1,000,000) no-op tasks, submitted
              one by one in windows: submit 20,000, wait for them, drop the
              futures, repeat.  This process's RSS (VmRSS) is sampled after
              every --every (100,000) tasks.  Reported: the first sample (the
              baseline, after warm-up), the max, the end, and the drift
              (end - baseline) / baseline; the target is a drift within 10%.
              --peers adds multiprocessing.Pool (apply_async) as a reference;
              it is off by default, as mp.Pool needs about 45 s for a million
              tasks here against prefork's 18.
  fork        the parent preloads --mb (200) MB, then starts a pool of 2
              workers; each worker reads 100 items of the preloaded object,
              then runs gc.collect().  Read from /proc/<pid>/smaps_rollup, per
              worker: Rss, Pss and USS (Private_Clean + Private_Dirty, what
              the worker alone holds), in MiB, the median over the workers;
              USS is read twice, after the reads alone and after gc.collect().
              Variants of the preloaded object:
                none     nothing: the worker's own footprint
                blob     one bytes object
                objects  a dict of small lists {i: [i, str(i)]}
              Pools: prefork.Executor(2), mp.Pool(2) and ProcessPoolExecutor(2),
              both with the fork context.

Why the objects are lists, not tuples: the cyclic GC untracks a tuple that
holds only ints and strings the first time it sees it, and never visits it
again; lists stay tracked, as most objects of a real program (instances,
lists, dicts of objects) do.  A full collection writes into the GC header of
every tracked object it visits, so in a worker that has not frozen what it
inherited (gc.freeze()), gc.collect() copies every page that holds one.  The
blob is made with ``b"x" * n``: ``bytes(n)`` is calloc'ed zero pages that are
never touched, and would not be resident at all.

Every measurement runs in a fresh interpreter, one child of this script per
(case, pool, variant): each pool forks from a parent that built its object
just before and never ran another pool, the preloaded memory is gone when the
child exits, and no pool's leftovers (threads, freed arenas, a fork server)
reach the next one's numbers.  The child prints its numbers as JSON on stdout.
The parent runs a full collection once after building the object and does
not freeze it: a freeze in the parent would be inherited by every pool's
workers and hide what the workers do themselves.  The worker pids are the
ones the tasks return (os.getpid()); tasks are sent in batches until every
worker has answered (bounded by a deadline).  "other USS" sums the pool's
remaining processes (prefork's fork server, which inherits the object too).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# _tasks: functions every pool pickles by reference, and the PRELOADED global the workers inherit
import _tasks
from _finish import finish

import prefork
from prefork.testing import descendants

WORKERS = 2
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "memory.json"
CASES = ("supervisor", "fork")
POOLS = ("prefork", "mp.Pool", "ProcessPoolExecutor")
VARIANTS = ("none", "blob", "objects")
BYTES_PER_ENTRY = 215  # RSS growth per {i: [i, str(i)]} entry, dict included, measured here (CPython 3.11)
MIB = 1 << 20


def rss_mib() -> float:
    """This process's resident set (VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def smaps(pid: int | str) -> dict[str, float]:
    """Rss, Pss and USS (Private_Clean + Private_Dirty) of a process, in MiB."""
    kb: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                kb[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": kb["Rss"] / 1024, "pss": kb["Pss"] / 1024,
            "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024}


class Pool:
    """One pool behind submit, wait and stop."""

    def __init__(self, name: str) -> None:
        self.name = name
        fork = multiprocessing.get_context("fork")
        if name == "prefork":
            self.pool: Any = prefork.Executor(WORKERS)
        elif name == "mp.Pool":
            self.pool = fork.Pool(WORKERS)
        elif name == "ProcessPoolExecutor":
            self.pool = cf.ProcessPoolExecutor(WORKERS, mp_context=fork)
        else:
            raise ValueError(f"unknown pool {name!r}; pools: {', '.join(POOLS)}")

    def submit(self, fn: Any, *args: Any) -> Any:
        if self.name == "mp.Pool":
            return self.pool.apply_async(fn, args)
        return self.pool.submit(fn, *args)

    def wait(self, handles: list[Any]) -> list[Any]:
        if self.name == "mp.Pool":
            return [h.get() for h in handles]
        return [h.result() for h in handles]

    def stop(self) -> None:
        if self.name == "mp.Pool":
            self.pool.close()
            self.pool.join()
        else:
            self.pool.shutdown(wait=True)


# -- the cases, each run in a child of this script ----------------------------------------


def child_supervisor(pool_name: str, tasks: int, every: int, window: int) -> dict[str, Any]:
    pool = Pool(pool_name)
    try:
        pool.wait([pool.submit(_tasks.noop)])
        samples: list[tuple[int, float]] = []
        done = 0
        t = time.perf_counter()
        while done < tasks:
            k = min(window, tasks - done, every - done % every)
            handles = [pool.submit(_tasks.noop) for _ in range(k)]
            pool.wait(handles)
            del handles
            done += k
            if done % every == 0 or done == tasks:
                samples.append((done, rss_mib()))
        elapsed = time.perf_counter() - t
    finally:
        pool.stop()
    baseline, end = samples[0][1], samples[-1][1]
    return {
        "tasks": tasks, "seconds": elapsed, "tasks_per_s": tasks / elapsed, "baseline_mib": baseline,
        "max_mib": max(r for _, r in samples), "end_mib": end, "drift_pct": (end - baseline) / baseline * 100,
        "samples": samples,
    }


def preload(variant: str, mb: float) -> tuple[Any, dict[str, Any]]:
    """The object the workers inherit, and how much it grew this process's RSS."""
    before = rss_mib()
    obj: Any = None
    info: dict[str, Any] = {}
    if variant == "blob":
        n = int(mb * 1_000_000)
        obj = b"x" * n  # b"x" * n touches every page; bytes(n) would be calloc'ed, never resident
        info["bytes"] = n
    elif variant == "objects":
        n = int(mb * 1_000_000 / BYTES_PER_ENTRY)
        obj = {i: [i, str(i)] for i in range(n)}
        info["entries"] = n
        info["objects"] = n * 3 + 1 if n else 0  # an int, a list and a str per entry, and the dict
    elif variant != "none":
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    gc.collect()  # the parent settles once before it forks; it is not frozen (see the docstring)
    info["preload_mib"] = rss_mib() - before
    return obj, info


def cover_workers(pool: Pool, collect: bool, deadline: float) -> dict[int, int]:
    """Run the probe until every worker has; {worker pid: its gc.get_freeze_count()}."""
    seen: dict[int, int] = {}
    while len(seen) < WORKERS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{pool.name}: only {len(seen)} of {WORKERS} workers ran a task")
        for pid, frozen in pool.wait([pool.submit(_tasks.probe_preloaded, collect) for _ in range(2 * WORKERS)]):
            seen[pid] = frozen
    return seen


def child_fork(pool_name: str, variant: str, mb: float) -> dict[str, Any]:
    obj, info = preload(variant, mb)
    _tasks.PRELOADED = obj  # set before the pool forks: the workers inherit it
    pool = Pool(pool_name)
    try:
        deadline = time.monotonic() + 30
        looked = cover_workers(pool, False, deadline)
        uss_lookup = {pid: smaps(pid)["uss"] for pid in looked}
        frozen = cover_workers(pool, True, deadline)
        workers = {pid: smaps(pid) for pid in frozen}
        others = descendants(os.getpid()) - set(frozen) - set(looked)
        other_uss = 0.0
        for pid in others:
            try:
                other_uss += smaps(pid)["uss"]
            except (FileNotFoundError, ProcessLookupError):
                pass  # gone since (a helper process that exited)
        parent = smaps("self")
    finally:
        pool.stop()
    return {
        **info,
        "parent_rss_mib": parent["rss"],
        "worker_rss_mib": statistics.median(w["rss"] for w in workers.values()),
        "worker_pss_mib": statistics.median(w["pss"] for w in workers.values()),
        "worker_uss_lookup_mib": statistics.median(uss_lookup.values()),
        "worker_uss_mib": statistics.median(w["uss"] for w in workers.values()),
        "other_uss_mib": other_uss,
        "others": len(others),
        "worker_frozen_objects": statistics.median(frozen.values()),
        "workers": {str(pid): {**w, "uss_lookup": uss_lookup.get(pid)} for pid, w in workers.items()},
    }


def run_child(args: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON from stdout."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_memory {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


# -- the parent: runs the children, prints, writes the JSON -------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--only", default="", help="comma-separated cases: " + ",".join(CASES))
    p.add_argument("--tasks", type=int, default=None, help="supervisor: tasks (1,000,000; 100,000 with --quick)")
    p.add_argument("--every", type=int, default=None, help="supervisor: tasks between RSS samples (100,000; 10,000)")
    p.add_argument("--window", type=int, default=20_000, help="supervisor: tasks in flight at most (20,000)")
    p.add_argument("--peers", action="store_true", help="supervisor: run multiprocessing.Pool too (about 45 s)")
    p.add_argument("--mb", type=float, default=None, help="fork: MB the parent preloads (200; 20 with --quick)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--pool", choices=POOLS, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tasks = args.tasks or (100_000 if args.quick else 1_000_000)
    every = args.every or (10_000 if args.quick else 100_000)
    mb = args.mb if args.mb is not None else (20 if args.quick else 200)
    if min(tasks, every, args.window) < 1 or mb < 0:
        p.error("--tasks, --every and --window must be positive, --mb not negative")
    sizes = ["--tasks", str(tasks), "--every", str(every), "--window", str(args.window), "--mb", str(mb)]
    if args.child:
        if args.pool is None or (args.child == "fork" and args.variant is None):
            p.error("--child needs --pool, and --variant for fork")
        if args.child == "supervisor":
            out = child_supervisor(args.pool, tasks, every, min(args.window, every))
        else:
            out = child_fork(args.pool, args.variant, mb)
        print(json.dumps(out))
        return 0
    chosen = [c for c in (args.only.split(",") if args.only else CASES) if c]
    for c in chosen:
        if c not in CASES:
            p.error(f"unknown case {c!r}; cases: {', '.join(CASES)}")
    result: dict[str, Any] = {"workers": WORKERS, "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if "supervisor" in chosen:
        pools = POOLS[:2] if args.peers else POOLS[:1]
        runs = {}
        for name in pools:
            runs[name] = run_child(["--child", "supervisor", "--pool", name, *sizes])
            print(f"supervisor: {name} done", flush=True)
        result["supervisor"] = {"tasks": tasks, "every": every, "window": min(args.window, every), "pools": runs}
    if "fork" in chosen:
        variants: dict[str, dict[str, Any]] = {}
        for variant in VARIANTS:
            variants[variant] = {}
            for name in POOLS:
                variants[variant][name] = run_child(["--child", "fork", "--pool", name, "--variant", variant, *sizes])
            print(f"fork: {variant} done", flush=True)
        result["fork"] = {"mb": mb, "variants": variants}
    return finish(result, args.json, report)


def report(result: dict[str, Any]) -> None:
    if "supervisor" in result:
        s = result["supervisor"]
        print(f"\nsupervisor: {s['tasks']:,} no-op tasks submitted one by one, {s['window']:,} at a time; "
              f"this process's RSS in MiB, sampled every {s['every']:,} tasks")
        print(f"{'pool':<22}{'tasks/s':>10}{'baseline':>10}{'max':>10}{'end':>10}{'drift':>9}  within 10%")
        for name, r in s["pools"].items():
            flat = "yes" if abs(r["drift_pct"]) <= 10 else "no"
            print(f"{name:<22}{r['tasks_per_s']:>10,.0f}{r['baseline_mib']:>10.1f}{r['max_mib']:>10.1f}"
                  f"{r['end_mib']:>10.1f}{r['drift_pct']:>8.1f}%  {flat}")
    if "fork" in result:
        f = result["fork"]
        print(f"\nfork: the parent preloads {f['mb']:g} MB, then a pool of {WORKERS} workers each reads 100 items "
              "and runs gc.collect(); MiB, median over the workers")
        print(f"{'variant':<9}{'preload':>9}  {'pool':<21}{'parent Rss':>11}{'Rss':>8}{'Pss':>8}"
              f"{'USS read':>10}{'USS gc':>9}{'other USS':>11}{'frozen':>10}")
        for variant, pools in f["variants"].items():
            for name, r in pools.items():
                print(f"{variant:<9}{r['preload_mib']:>9.1f}  {name:<21}{r['parent_rss_mib']:>11.1f}"
                      f"{r['worker_rss_mib']:>8.1f}{r['worker_pss_mib']:>8.1f}{r['worker_uss_lookup_mib']:>10.1f}"
                      f"{r['worker_uss_mib']:>9.1f}{r['other_uss_mib']:>11.1f}{r['worker_frozen_objects']:>10,.0f}")
        print("\nUSS = Private_Clean + Private_Dirty: memory the worker alone holds.  USS read: after the reads;"
              "\nUSS gc: after gc.collect() in the worker.  other USS: the pool's other processes (prefork's"
              "\nfork server).  frozen: gc.get_freeze_count() in the worker.")


if __name__ == "__main__":
    sys.exit(main())
