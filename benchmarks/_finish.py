"""The end of a benchmark run: no process left behind, the report, the JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefork.testing import descendants


def finish(result: dict[str, Any], path: Path, report: Callable[[dict[str, Any]], None]) -> int:
    """Record the processes still under this one, print ``report(result)``, write the
    JSON to ``path``; 1 if a process was left behind, else 0."""
    left = descendants(os.getpid())
    result["leftover_processes"] = sorted(left)
    report(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {path}")
    if left:
        print(f"error: processes left behind: {sorted(left)}", file=sys.stderr)
        return 1
    return 0
