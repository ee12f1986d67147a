"""Functions the tests' hosts may be asked to run (importable by hosts started as processes:
``conftest.host_env`` puts this folder on their path)."""

from __future__ import annotations

import os
import time


def touch(path: str) -> str:
    """Create ``path``, failing if it exists: a side effect a test can see, once."""
    with open(path, "x") as f:
        f.write(str(os.getpid()))
    return path


def append(path: str, line: str) -> int:
    """Append ``line`` to ``path``: each run of a task leaves one line."""
    with open(path, "a") as f:
        f.write(line + "\n")
    return len(line)


def nap(value: int, seconds: float) -> int:
    """``value`` after ``seconds``: a task that is still running when something happens."""
    time.sleep(seconds)
    return value


def die() -> None:
    """Kill the worker running it (prefork never dispatches private names such as ``os:_exit``)."""
    os._exit(3)


def record(path: str, value: int, seconds: float) -> int:
    """Append ``value`` to ``path`` (one line per run), nap, return it: runs can be counted."""
    append(path, str(value))
    return nap(value, seconds)


class Tattle(dict):  # type: ignore[type-arg]
    """A dict that leaves a line in ``path`` wherever it is unpickled: proof of a decoding."""

    def __init__(self, path: str, items: dict) -> None:  # type: ignore[type-arg]
        super().__init__(items)
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_tattled, (self.path, dict(self)))


def _tattled(path: str, items: dict) -> Tattle:  # type: ignore[type-arg]
    append(path, str(os.getpid()))
    return Tattle(path, items)


def tattle(path: str) -> Tattle:
    """A result that says so when anyone unpickles it (it is JSON too: a dict)."""
    return Tattle(path, {"ok": 1})
