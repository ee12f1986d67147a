"""What the plugin's tests share besides fixtures: the key, and how to start a host as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

#: The HMAC key of the tests' hosts and clients.
SECRET = "correct horse battery staple, 32+"
TESTS = Path(__file__).resolve().parent


def host_env() -> dict[str, str]:
    """The environment of a host started as a process: ``hosttasks`` (this folder) importable, no key."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.pop("PREFORK_REDIS_SECRET", None)
    return env


def host_config(
    path: Path,
    url: str,
    app: str,
    *,
    secret: str | None = SECRET,
    allow: list[str] | None = None,
    workers: int = 2,
    transport: str = "",
    resolver: str | None = None,
) -> Path:
    """A host's ``prefork.toml`` for ``prefork run`` (the secure configuration unless told otherwise):
    ``allow`` is the ``allow`` resolver's patterns, ``resolver`` a whole [resolver] table instead,
    ``transport`` more lines of the [transport] table."""
    lines = [
        f'name = "{path.stem}"', 'app = "prefork_redis:serve"', 'plugins = ["prefork_redis"]',
        "[scaling]", 'name = "fixed"', f"workers = {workers}",
        "[transport]", 'name = "redis"', f'url = "{url}"', f'stream = "{app}"', "lease_ms = 900", "block_ms = 200",
    ]  # fmt: skip
    if secret is not None:
        lines.append(f'secret = "{secret}"')
    lines += [line for line in transport.splitlines() if line.strip()]
    if resolver is not None:
        lines += ["[resolver]", *resolver.splitlines()]
    elif allow is not None:
        lines += ["[resolver]", 'name = "allow"', f"allow = {allow!r}".replace("'", '"')]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_host(config: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``prefork run --config <config>`` as a host process; its stderr goes to ``<config>.log``."""
    log = config.with_suffix(".log")
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefork", "run", "--config", str(config)],
            cwd=config.parent, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=host_env(),
        )  # fmt: skip
    return proc, log


def stop_host(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after 20 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(20)
