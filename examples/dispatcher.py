"""POE::Component::PreforkDispatch's synopsis on prefork: five slow tasks, four
forks at most, two of them forked at start; more are forked while requests
wait, one every spawn delay.

    python examples/dispatcher.py            # each task sleeps 10 s, as in the seed
    python examples/dispatcher.py 0.5        # a quicker run
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from prefork import Dispatcher


def do_slow_task(sender: Any, param1: str, param2: int) -> dict[str, int]:
    """The handler: called with (from, *params) in a worker."""
    print(f"Task running with {param1!r}, {param2!r} in {os.getpid()}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("SLOW_TASK_SECONDS", "10")))
    return {"success": 1}


def main(seconds: float = 10.0, spawn_delay: float = 2.0) -> int:
    os.environ["SLOW_TASK_SECONDS"] = str(seconds)
    done = threading.Event()
    finished: list[int] = []

    def do_slow_task_cb(request: dict[str, Any], result: dict[str, Any]) -> None:
        outcome = "successful" if result.get("success") else "failure"
        print(f"Task with param {request['params'][1]} returned {outcome} after {request['elapsed']:.1f} s", flush=True)
        finished.append(request["params"][1])
        if len(finished) == 5:
            done.set()

    with Dispatcher(methods={"do_slow_task": do_slow_task}, max_forks=4, pre_fork=2, spawn_delay=spawn_delay) as dispatcher:
        for n in range(1, 6):
            print(f"Enqueued request {n}", flush=True)
            dispatcher.new_request({"method_name": "do_slow_task", "upon_result": do_slow_task_cb, "params": ["a value", n]})
        if not done.wait(5 * seconds + 4 * spawn_delay + 30):
            print("not every task finished", file=sys.stderr)
            return 1
        print(f"forked {dispatcher.stats()['spawned_total']} workers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0))
