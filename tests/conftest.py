"""Every test here is checked for leaked processes afterwards (live, zombie or orphan)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from prefork.testing import leaked_processes, present_processes

os.environ.setdefault("PREFORK_DISABLE_PLUGIN_AUTOLOAD", "1")

# Control sockets of the pools the tests start (prefork run/serve listen by default) go to a
# directory of this test run's own: never the user's, never another run's at the same time.
_RUNTIME = tempfile.mkdtemp(prefix="prefork-tests-")
os.chmod(_RUNTIME, 0o700)
os.environ["XDG_RUNTIME_DIR"] = _RUNTIME
atexit.register(shutil.rmtree, _RUNTIME, True)


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    before = present_processes()
    yield
    leaks = leaked_processes(before)
    assert not leaks, "processes left behind (live or zombie):\n" + "\n".join(leaks)
