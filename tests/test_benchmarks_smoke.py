"""The executor and memory benchmarks run (no speed or memory figure is asserted here, ever)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POOLS = ("prefork", "mp.Pool", "ProcessPoolExecutor")


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_executor_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "executor.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_executor.py", "--quick", "--rounds", "1", "--only", "roundtrip,submit",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    for pool in ("prefork", "mp.Pool", "ProcessPoolExecutor"):
        assert data["medians"][pool]["submit"] > 0
        assert 0 < data["medians"][pool]["roundtrip_p50"] <= data["medians"][pool]["roundtrip_p99"]
    assert "prefork/best peer" in run.stdout
    assert data["floor_us"] > 0  # the socketpair floor, measured in the same run
    tables = subprocess.run(
        [sys.executable, "benchmarks/tables.py", "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert tables.returncode == 0, tables.stderr
    assert "| sequential round trip of a no-op task, p50 | µs |" in tables.stdout
    assert "the socketpair floor" in tables.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case", "label"), [("payload", "payload (MiB/s)"), ("map_auto", "map_auto (tasks/s)")])
def test_an_executor_case_runs_for_every_pool(tmp_path: Path, case: str, label: str) -> None:
    out = tmp_path / "executor.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_executor.py", "--quick", "--rounds", "1", "--only", case,
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert list(data["sizes"]) == [case]
    assert set(POOLS) <= set(data["medians"])
    for pool, metrics in data["medians"].items():
        assert positive(metrics[case]), (pool, metrics)
    assert label in run.stdout and "prefork/best peer" in run.stdout


@pytest.mark.timeout(120)
def test_the_supervisor_memory_case_samples_rss(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_memory.py", "--quick", "--only", "supervisor", "--tasks", "20000",
         "--every", "5000", "--peers", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["leftover_processes"] == [] and "fork" not in data
    pools = data["supervisor"]["pools"]
    assert set(pools) == {"prefork", "mp.Pool"}
    for name, r in pools.items():
        assert r["tasks"] == 20_000 and len(r["samples"]) == 4, name
        for key in ("tasks_per_s", "baseline_mib", "max_mib", "end_mib"):
            assert positive(r[key]), (name, key, r[key])
        assert math.isfinite(r["drift_pct"])
        assert name in run.stdout
    assert "within 10%" in run.stdout


@pytest.mark.timeout(120)
def test_the_fork_memory_case_reads_every_pool(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_memory.py", "--quick", "--only", "fork", "--mb", "5", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["leftover_processes"] == [] and "supervisor" not in data
    variants = data["fork"]["variants"]
    assert set(variants) == {"none", "blob", "objects"}
    for variant, pools in variants.items():
        assert set(pools) == set(POOLS)
        for name, r in pools.items():
            for key in ("parent_rss_mib", "worker_rss_mib", "worker_pss_mib", "worker_uss_lookup_mib",
                        "worker_uss_mib"):
                assert positive(r[key]), (variant, name, key, r[key])
            assert len(r["workers"]) == 2
    assert variants["blob"]["prefork"]["bytes"] == 5_000_000
    assert variants["objects"]["prefork"]["entries"] > 0
    for word in ("USS gc", "objects", *POOLS):
        assert word in run.stdout


def test_the_redis_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    import shutil

    if shutil.which("redis-server") is None or importlib.util.find_spec("prefork_redis") is None:
        if os.environ.get("CI"):
            pytest.fail("bench_redis needs redis-server and prefork-redis, which CI installs")
        pytest.skip("bench_redis needs redis-server and prefork-redis (pip install ./plugins/prefork-redis)")
    out = tmp_path / "redis.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_redis.py", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    medians = json.loads(out.read_text())["medians"]
    assert medians["throughput: tasks/s, prefork-redis"] > 0
    one, two = (medians[f"hosts: tasks/s, {n} host(s) x 1 worker, no-op"] for n in (1, 2))
    assert one > 0 and two > 0
    assert 0 < medians["latency: p50 ms, prefork-redis"] <= medians["latency: p99 ms, prefork-redis"]
    assert "through Redis" in run.stdout


@pytest.mark.timeout(180)
def test_the_scale_benchmark_runs_every_case_and_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_scale.py", "--quick", "--tasks", "2000", "--workers", "2,4",
         "--cpu-tasks", "500", "--seq", "50", "--items", "40000", "--every", "10000", "--chunksize", "2000",
         "--buffersize", "4", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["leftover_processes"] == [] and data["rounds"] == 1
    queued = data["queued"]
    assert set(queued["pools"]) == {"prefork", "ProcessPoolExecutor"} and queued["tasks"] == 2000
    for name, m in queued["pools"].items():
        assert positive(m["bytes_per_task"]) and positive(m["submit_cpu_us"]), (name, m)
        assert [r["answered"] for r in m["rounds"]] == [0]  # the workers were held: every task stayed queued
    assert positive(queued["ratio"]) and isinstance(queued["met"], bool)
    for name, rows in queued["breakdown"].items():
        assert rows and all(":" in row["where"] and math.isfinite(row["bytes_per_task"]) for row in rows), name
    cpu = data["cpu"]
    assert cpu["workers"] == [2, 4] and set(cpu["sizes"]) == {"2", "4"}
    for size, m in cpu["sizes"].items():
        for key in ("cpu_us", "caller_us", "wall_us", "seq_cpu_us", "seq_wall_us"):
            assert positive(m[key]), (size, key, m[key])
        assert m["rounds"][0]["alive_at_end"] == int(size)
    assert math.isfinite(cpu["growth_pct"]) and isinstance(cpu["met"], bool)
    lazymap = data["lazymap"]
    assert set(lazymap["variants"]) == {"lazy", "eager", "eager_auto"}
    assert lazymap["variants"]["lazy"]["options"] == {"chunksize": 2000, "buffersize": 4}
    assert lazymap["variants"]["eager"]["options"] == {"chunksize": 2000} and lazymap["rounds"] == 1
    for name, m in lazymap["variants"].items():
        assert [n for n, _ in m["rounds"][0]["samples"]] == [10_000, 20_000, 30_000, 40_000], name
        assert positive(m["items_per_s"]) and positive(m["max_mib"]), (name, m)
    for key in ("speed_ratio", "best_round_ratio", "cpu_ratio"):
        assert positive(lazymap[key]), (key, lazymap[key])
    assert isinstance(lazymap["flat"], bool)
    for word in ("bytes/task", "growth 2 -> 4 workers", "lazy/"):
        assert word in run.stdout
    tables = subprocess.run(
        [sys.executable, "benchmarks/tables.py", "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert tables.returncode == 0, tables.stderr
    for line in ("| prefork | ", "| ProcessPoolExecutor | ", "| 4 | ", "| lazy | chunksize=2,000, buffersize=4 | "):
        assert line in tables.stdout


def test_the_scale_benchmark_names_a_bad_case() -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_scale.py", "--only", "queued,nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert "unknown case 'nope' in --only; cases: queued, cpu, lazymap" in run.stderr
