"""Smoke test of benchmarks/bench_mpm.py: a quick run produces numbers for every server.

It never asserts speed: the machine running the tests may be busy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("baseline", "mpm-fixed", "mpm-spare")


@pytest.mark.timeout(120)
def test_bench_mpm_quick_run_reports_every_server(tmp_path: Path) -> None:
    out = tmp_path / "mpm.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_mpm.py", "--quick", "--rounds", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["leftover_processes"] == []
    assert set(result["servers"]) == set(SERVERS)
    for name in SERVERS:
        entry = result["servers"][name]
        for key in ("rps", "p50_us", "p99_us", "ratio_to_baseline", "server_cpu_us_per_req"):
            value = entry[key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, value)
        assert entry["rps"] > 0 and entry["p50_us"] > 0 and entry["p99_us"] >= entry["p50_us"]
        assert len(entry["rounds"]) == 1 and entry["rounds"][0]["requests"] > 0
    assert result["servers"]["baseline"]["ratio_to_baseline"] == 1.0
    for name in SERVERS:
        assert name in proc.stdout  # the table
