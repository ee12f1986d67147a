"""Every test here is checked for leaked processes afterwards (live, zombie or orphan)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from prefork.testing import leaked_processes, present_processes

os.environ.setdefault("PREFORK_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    before = present_processes()
    yield
    leaks = leaked_processes(before)
    assert not leaks, "processes left behind (live or zombie):\n" + "\n".join(leaks)
