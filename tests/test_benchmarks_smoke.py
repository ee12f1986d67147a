"""The executor benchmark runs (no speed is asserted here, ever)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
