"""The default job of the repository's prefork.toml: count the primes below ten
million, split into chunks across the pool's workers.

    prefork run                       # uses ./prefork.toml
    prefork run --set scaling.workers=4
    python examples/primes.py         # the same job without the command

It prints which worker counted which chunk and checks the total against the
known count, so a wrong answer is visible at once.
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import Executor, as_completed

LIMIT = 10_000_000
CHUNKS = 20
KNOWN = {10: 4, 1000: 168, 100_000: 9592, 1_000_000: 78498, 2_000_000: 148933, 10_000_000: 664579}


def count_primes(lo: int, hi: int) -> tuple[int, int, int, int]:
    """Primes in [lo, hi) by trial division with a small sieve of divisors."""
    root = math.isqrt(hi) + 1
    sieve = bytearray([1]) * (root + 1)
    sieve[0:2] = b"\0\0"
    for i in range(2, math.isqrt(root) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    small = [i for i in range(2, root + 1) if sieve[i]]
    block = bytearray([1]) * (hi - lo)
    for p in small:
        start = max(p * p, (lo + p - 1) // p * p)
        block[start - lo :: p] = bytearray(len(block[start - lo :: p]))
    for n in range(lo, min(hi, 2)):
        block[n - lo] = 0
    return lo, hi, sum(block), os.getpid()


def main(pool: Executor, limit: int = LIMIT, chunks: int = CHUNKS) -> int:
    t0 = time.perf_counter()
    step = -(-limit // chunks)
    futures = [pool.submit(count_primes, lo, min(lo + step, limit)) for lo in range(0, limit, step)]
    total = 0
    pids: dict[int, int] = {}
    for fut in as_completed(futures):
        lo, hi, n, pid = fut.result()
        total += n
        pids[pid] = pids.get(pid, 0) + 1
        print(f"  [{lo:>9,}, {hi:>9,})  {n:>6} primes  (worker {pid})")
    elapsed = time.perf_counter() - t0
    print(f"{total} primes below {limit:,} in {elapsed:.2f} s, {len(futures)} chunks on {len(pids)} workers")
    expected = KNOWN.get(limit)
    if expected is not None and total != expected:
        print(f"WRONG: expected {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import prefork

    with prefork.Executor() as executor:
        sys.exit(main(executor))
