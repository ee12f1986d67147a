"""Parallel::Fork::BossWorkerAsync's synopsis on prefork.

    python examples/boss_worker.py                      # prints 12 and "the answer is: 12"
    prefork run -c examples/boss_worker.toml            # the same job, configured from the file

Uncomment the sleep to see a timeout, or the raise to see a worker error: both
come back as ``{"ERROR": ...}`` results, and the worker is replaced.
"""

from __future__ import annotations

import sys
from typing import Any

from prefork import BossWorker


def work(job: dict[str, int]) -> dict[str, int]:
    # import time; time.sleep(3)   # uncomment to test the timeout
    # raise RuntimeError("rattle")  # uncomment to test a worker error
    return {"product": job["a"] * job["b"]}


def handle_result(result: dict[str, Any]) -> dict[str, Any]:
    if "product" in result:
        result["string"] = f"the answer is: {result['product']}"
    return result


def run(bw: BossWorker) -> int:
    """Add the job and print its result: the seed's main loop."""
    bw.add_work({"a": 3, "b": 4})
    while bw.pending():
        ref = bw.get_result()
        if ref.get("ERROR"):
            print(ref["ERROR"], file=sys.stderr)
        else:
            print(ref["product"])
            print(ref["string"])
    return 0


def main() -> int:
    bw = BossWorker(work_handler=work, result_handler=handle_result, global_timeout=2)
    try:
        return run(bw)
    finally:
        bw.shut_down()


if __name__ == "__main__":
    sys.exit(main())
