"""The Markdown tables of one benchmark run, from its JSON files.

    python benchmarks/tables.py                      # reads benchmarks/results/*.json
    python benchmarks/tables.py --results /tmp/bench

``run_all.py`` writes them to ``<results>/tables.md`` after the run, so the
tables in docs/performance.md are copied from one run, not typed.  Each row
gives prefork's median, the best peer's, their ratio (> 1: prefork is better)
and the issue's target for that case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: metric -> (what, unit, higher is better, the target)
EXECUTOR_ROWS: dict[str, tuple[str, str, bool, str]] = {
    "submit": ("20,000 no-op tasks submitted one by one", "tasks/s", True, "≥ 3x the best peer"),
    "map": ("200,000 no-op tasks, bulk map, chunks of 2,500", "tasks/s", True, "≥ the best peer"),
    "map_auto": ("50,000 no-op tasks, bulk map, default chunk size", "tasks/s", True, "≥ the best peer"),
    "payload": ("200 tasks of 1 MiB in, length out", "MiB/s", True, "≥ 1.5x the best peer"),
    "roundtrip_p50": ("sequential round trip of a no-op task, p50", "µs", False, "≤ 1.5x the socketpair floor"),
    "roundtrip_p99": ("the same, p99", "µs", False, "< 2x the best peer's p50"),
    "start": ("pool start to first result", "ms", False, "≤ the best peer"),
    "shutdown": ("shutdown with idle workers", "ms", False, "≤ 5 ms"),
    "cpu": ("200 CPU-bound tasks of 10 ms", "% of ideal", True, "≥ 98 %"),
}


def _num(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def executor_table(data: dict[str, Any]) -> str:
    medians: dict[str, dict[str, float]] = data["medians"]
    lines = [
        f"2 workers, {data['rounds']} rounds interleaved, medians; Python {data['python']}, {data['cpus']} CPUs.",
        "",
        "| case | unit | prefork | best peer | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for metric, (what, unit, higher, target) in EXECUTOR_ROWS.items():
        if metric not in medians.get("prefork", {}):
            continue
        ours = medians["prefork"][metric]
        peers = {name: m[metric] for name, m in medians.items() if name != "prefork" and metric in m}
        if not peers:
            continue
        best_name = (max if higher else min)(peers, key=lambda n: peers[n])
        best = peers[best_name]
        ratio = ours / best if higher else best / ours
        lines.append(
            f"| {what} | {unit} | {_num(ours)} | {best_name}, {_num(best)} | {ratio:.2f}x | {target} |"
        )
    floor = data.get("floor_us")
    if floor:
        lines += ["", f"Cross-core socketpair round trip (the floor), measured in the same run: p50 {floor:.1f} µs."]
    lines += ["", "Every pool, every case (medians):", "", executor_all(medians)]
    return "\n".join(lines)


def executor_all(medians: dict[str, dict[str, float]]) -> str:
    names = list(medians)
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric, (_, unit, _, _) in EXECUTOR_ROWS.items():
        if any(metric in medians[n] for n in names):
            lines.append(f"| {metric} ({unit}) | " + " | ".join(_num(medians[n].get(metric, float("nan"))) for n in names) + " |")
    return "\n".join(lines)


def memory_tables(data: dict[str, Any]) -> str:
    lines = ["| pool | tasks | tasks/s | RSS baseline MiB | max | end | drift |", "|---|---|---|---|---|---|---|"]
    for name, run in data["supervisor"]["pools"].items():
        lines.append(
            f"| {name} | {run['tasks']:,} | {run['tasks_per_s']:,.0f} | {run['baseline_mib']:.1f} | "
            f"{run['max_mib']:.1f} | {run['end_mib']:.1f} | {run['drift_pct']:+.1f} % |"
        )
    lines += [
        "",
        f"Workers after fork, the parent having preloaded {data['fork']['mb']} MB (median over 2 workers, MiB; "
        "USS after `gc.collect()` in the worker):",
        "",
        "| preloaded | pool | worker Rss | worker Pss | worker USS | USS of the pool's other processes |",
        "|---|---|---|---|---|---|",
    ]
    for variant, pools in data["fork"]["variants"].items():
        for name, m in pools.items():
            lines.append(
                f"| {variant} ({m['preload_mib']:.0f} MiB) | {name} | {m['worker_rss_mib']:.1f} | "
                f"{m['worker_pss_mib']:.1f} | {m['worker_uss_mib']:.1f} | {m['other_uss_mib']:.1f} |"
            )
    return "\n".join(lines)


def mpm_table(data: dict[str, Any]) -> str:
    servers = data["servers"]
    base = servers["baseline"]["rps"]
    lines = [
        f"{data['config']['clients']} client processes x {data['config']['conns_per_client']} connections, "
        f"one request per connection, {data['config']['rounds']} rounds of {data['config']['seconds']:.0f} s, medians.",
        "",
        "| server | requests/s | vs baseline | p50 µs | p99 µs | server CPU/request µs |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in servers.items():
        lines.append(
            f"| {name} ({s['description']}) | {s['rps']:,.0f} | {s['rps'] / base:.2f}x | {s['p50_us']:,.0f} | "
            f"{s['p99_us']:,.0f} | {s['server_cpu_us_per_req']:.1f} |"
        )
    return "\n".join(lines)


def redis_table(data: dict[str, Any]) -> str:
    workers = data.get("workers", 1)
    lines = [
        f"Each system with {workers} worker{'s' if workers != 1 else ''} unless the measure says otherwise, "
        f"on one redis-server; {data['tasks']:,} no-op tasks at once, {data['trips']:,} sequential round trips; "
        f"{data['rounds']} rounds, interleaved, medians.",
    ]
    if data.get("peers"):
        lines += ["", "How each peer's workers ran: " + "; ".join(f"{name}: {how}" for name, how in data["peers"].items()) + "."]
    lines += ["", "| measure | value |", "|---|---|"]
    lines += [f"| {key} | {_num(value)} |" for key, value in data["medians"].items()]
    return "\n".join(lines)


def scale_tables(data: dict[str, Any]) -> str:
    """bench_scale.py: memory per queued task, the caller's CPU per task by pool size, the lazy map."""
    met = {True: "met", False: "not met"}
    map_rounds = f"; the lazy map {data['lazymap']['rounds']}" if "lazymap" in data else ""
    lines = [f"Medians of interleaved rounds ({data['rounds']}{map_rounds}), each in a fresh interpreter; "
             f"Python {data['python']}.", ""]
    if "queued" in data:
        q = data["queued"]
        lines += [
            f"Memory per queued task: {q['tasks']:,} no-op tasks submitted while both workers are held "
            "(none runs); the caller's VmRSS growth per task.",
            "",
            "| pool | bytes per queued task | submit CPU µs/task |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {m['bytes_per_task']:,.0f} | {m['submit_cpu_us']:.1f} |" for name, m in q["pools"].items()]
        lines += ["", f"prefork / ProcessPoolExecutor: {q['ratio']:.2f}x (target ≤ {q['target']}x: {met[q['met']]}).", ""]
    if "cpu" in data:
        c = data["cpu"]
        lines += [
            f"The caller process's CPU per task (getrusage: the caller's thread and the supervisor's), {c['tasks']:,} "
            f"no-op tasks submitted one by one, then waited for; and {c['seq']:,} one at a time (no target).",
            "",
            "| workers | CPU µs/task | of which the caller's thread | wall µs/task | one at a time: CPU µs/task |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {w} | {m['cpu_us']:.2f} | {m['caller_us']:.2f} | {m['wall_us']:.2f} | {m['seq_cpu_us']:.1f} |"
            for w, m in c["sizes"].items()
        ]
        lines += ["", f"Growth from {min(c['workers'])} to {max(c['workers'])} workers: {c['growth_pct']:+.1f} % "
                      f"(target < {c['target_pct']:g} %: {met[c['met']]}); one at a time: {c['seq_growth_pct']:+.1f} %.", ""]
    if "lazymap" in data:
        m = data["lazymap"]
        lines += [
            f"`map(noop_arg, range({m['items']:,}))`, 2 workers, {m['rounds']} rounds; the caller's VmRSS (MiB) sampled "
            f"every {m['every']:,} items.",
            "",
            "| map | options | items/s | CPU ns/item | RSS before | first sample | max | growth after the first |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, v in m["variants"].items():
            options = ", ".join(f"{k}={val:,}" for k, val in v["options"].items()) or "default chunking"
            lines.append(
                f"| {name} | {options} | {v['items_per_s']:,.0f} | {v['cpu_ns_per_item']:.0f} | {v['before_mib']:.1f} | "
                f"{v['first_mib']:.1f} | {v['max_mib']:.1f} | {v['growth_pct']:+.1f} % |"
            )
        lines += ["", f"lazy / {m['best_eager']}, items/s: {m['speed_ratio']:.2f}x (target ≥ {m['target_speed']}x); memory "
                      f"flat (within {m['flat_pct']:g} % in every round): {'yes' if m['flat'] else 'no'} ({met[m['met']]}). "
                      f"Less swayed by the load: the best rounds {m['best_round_ratio']:.2f}x, the caller's CPU per item "
                      f"{m['cpu_ratio']:.2f}x (the faster eager map's over the lazy one's); {m['rounds']} rounds."]
    return "\n".join(lines).rstrip()


def render(results: Path) -> str:
    out: list[str] = []
    for name, title, fn in (
        ("executor", "Executor, beside the peers", executor_table),
        ("memory", "Memory", memory_tables),
        ("scale", "Scale: queued tasks, pool size, a lazy map", scale_tables),
        ("mpm", "MPM server, beside a hand-written fork + accept loop", mpm_table),
        ("redis", "Through Redis (prefork-redis)", redis_table),
    ):
        path = results / f"{name}.json"
        if path.exists():
            out += [f"### {title}", "", fn(json.loads(path.read_text())), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    text = render(args.results)
    if not text:
        print(f"no results in {args.results}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
