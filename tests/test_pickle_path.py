"""Naming the part of a task that cannot be serialized."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

import prefork
from prefork._pickle_path import find_unserializable


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


class Conn:
    def __init__(self) -> None:
        self.name = "db"
        self._lock = threading.Lock()


class Holder:
    def __init__(self) -> None:
        self.conn = Conn()
        self.ok = [1, 2, 3]


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ((1, threading.Lock()), "args[1]"),
        ((1, {"db": Holder()}), "args[1]['db'].conn._lock"),
        (([0, [1, [2, threading.Lock()]]],), "args[0][1][1][1]"),
        (({"a": 1, "b": {threading.Lock()}.__class__},), None),  # a class pickles by reference
        ((Holder(),), "args[0].conn._lock"),
    ],
)
def test_the_path_names_the_innermost_culprit(obj: Any, path: str | None) -> None:
    assert find_unserializable(obj, dumps, "args") == path


def test_something_that_pickles_has_no_path() -> None:
    assert find_unserializable((1, "x", {"k": [1.5]}), dumps, "args") is None


def test_a_deep_chain_stops_at_the_depth_limit() -> None:
    deep: Any = threading.Lock()
    for _ in range(20):
        deep = [deep]
    path = find_unserializable((deep,), dumps, "args")
    assert path is not None and path.startswith("args[0][0][0]")


def test_the_executor_names_the_path_in_the_error_of_that_future() -> None:
    with prefork.Executor(1) as ex:
        bad = ex.submit(print, 1, {"db": Holder()})
        good = ex.submit(abs, -3)
        assert good.result(timeout=10) == 3
    exc = bad.exception(timeout=10)
    assert type(exc) is TypeError
    assert "(at args[1]['db'].conn._lock)" in exc.__notes__[0]
    assert "cannot pickle '_thread.lock' object" in str(exc)
