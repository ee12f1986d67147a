"""The examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import prefork
from examples import primes

ROOT = Path(__file__).resolve().parent.parent


def test_primes_script_runs_as_written() -> None:
    out = subprocess.run([sys.executable, "examples/primes.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "664579 primes below 10,000,000" in out.stdout


def test_primes_job_spreads_over_workers_and_checks_itself(capsys) -> None:  # type: ignore[no-untyped-def]
    with prefork.Executor(2) as ex:
        assert primes.main(ex, limit=1_000_000, chunks=8) == 0
    text = capsys.readouterr().out
    assert "78498 primes below 1,000,000" in text
    assert "8 chunks" in text


def test_primes_counts_match_a_plain_sieve() -> None:
    assert primes.count_primes(0, 1000)[2] == 168
    assert primes.count_primes(1000, 2000)[2] == 303 - 168
    assert primes.count_primes(0, 2)[2] == 0
