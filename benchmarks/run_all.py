"""Every benchmark in a row, with its default options: executor, memory, scale, mpm, redis.

    python benchmarks/run_all.py                        # about 15 minutes on 2 cores
    python benchmarks/run_all.py --quick --results /tmp/bench

Each writes its JSON to ``<results>/<name>.json`` (default benchmarks/results/)
and what it printed to ``<results>/<name>.txt``; the output is shown as it
comes.  At the end ``tables.py`` writes the Markdown tables of the run to
``<results>/tables.md`` (docs/performance.md copies them).  A failing benchmark does not stop the others; the exit status is 1 if
any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("executor", "memory", "scale", "mpm", "redis")  # benchmarks/bench_<name>.py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (a smoke run)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON and text go")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in BENCHMARKS:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(args.results / f"{name}.json")]
        if args.quick:
            cmd.append("--quick")
        print(f"== {' '.join(cmd[1:])}", flush=True)
        with (args.results / f"{name}.txt").open("w") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
            log.write(f"rc={rc}\n")
        if rc:
            failed.append(name)
            print(f"== {name} failed (exit status {rc})", flush=True)
    tables = subprocess.run([sys.executable, str(HERE / "tables.py"), "--results", str(args.results)],
                            capture_output=True, text=True)
    (args.results / "tables.md").write_text(tables.stdout)
    print(f"== Markdown tables: {args.results / 'tables.md'}")
    if failed:
        print(f"== failed: {', '.join(failed)}")
        return 1
    print(f"== done: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
