"""LightFuture behaves as concurrent.futures.Future does, also under races."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from prefork._future import LightFuture
from prefork.strategies.sink import KillableFuture

OPS = [
    "set_running_or_notify_cancel", "set_result", "set_exception", "cancel", "done", "cancelled",
    "running", "result", "exception", "add_done_callback",
]


def apply(fut: cf.Future[Any], op: str, calls: list[str]) -> Any:
    try:
        if op == "set_result":
            fut.set_result(42)
            return "ok"
        if op == "set_exception":
            fut.set_exception(ValueError("boom"))
            return "ok"
        if op == "result":
            return ("value", fut.result(timeout=0))
        if op == "exception":
            return ("exc", repr(fut.exception(timeout=0)))
        if op == "add_done_callback":
            fut.add_done_callback(lambda f: calls.append(f"cb:{f.cancelled()}:{f.done()}"))
            return "ok"
        return getattr(fut, op)()
    except BaseException as exc:  # the same exception type from both is what counts
        return ("raised", type(exc).__name__)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(OPS), max_size=8))
def test_every_sequence_of_operations_matches_the_standard_future(ops: list[str]) -> None:
    std: cf.Future[Any] = cf.Future()
    light = LightFuture()
    std_calls: list[str] = []
    light_calls: list[str] = []
    for op in ops:
        assert apply(light, op, light_calls) == apply(std, op, std_calls), (ops, op)
        assert light_calls == std_calls, ops
    assert light._state == std._state


def test_a_waiter_always_wakes_whichever_side_comes_first() -> None:
    for i in range(2000):
        fut = LightFuture()
        assert fut.set_running_or_notify_cancel()
        got: list[Any] = []
        waiter = threading.Thread(target=lambda f=fut, g=got: g.append(f.result(timeout=5)))
        waiter.start()
        fut.set_result(i)
        waiter.join(10)
        assert not waiter.is_alive() and got == [i]


def test_wait_and_as_completed_see_results_set_from_another_thread() -> None:
    futures = [LightFuture() for _ in range(200)]
    for f in futures:
        f.set_running_or_notify_cancel()

    def answer() -> None:
        for n, f in enumerate(futures):
            if n % 2:
                f.set_result(n)
            else:
                f.set_exception(KeyError(n))

    setter = threading.Thread(target=answer)
    setter.start()
    seen = sorted(futures.index(f) for f in cf.as_completed(futures, timeout=10))
    done, pending = cf.wait(futures, timeout=10)
    setter.join(10)
    assert seen == list(range(200)) and len(done) == 200 and not pending
    assert futures[3].result() == 3 and isinstance(futures[4].exception(), KeyError)


def test_done_callbacks_run_once_when_added_before_or_after_the_outcome() -> None:
    calls: list[int] = []
    fut = LightFuture()
    fut.add_done_callback(lambda f: calls.append(f.result()))
    fut.set_result(1)
    fut.add_done_callback(lambda f: calls.append(f.result() + 1))
    assert calls == [1, 2]


def test_a_killable_future_still_cancels_while_running() -> None:
    killed: list[bool] = []
    fut = KillableFuture(lambda: killed.append(True))
    assert fut.set_running_or_notify_cancel()
    assert fut.cancel() and fut.cancelled() and killed == [True]


def test_a_done_callback_added_while_the_outcome_is_set_runs_exactly_once() -> None:
    import threading

    from prefork._future import LightFuture

    for _ in range(300):
        fut = LightFuture()
        calls: list[int] = []
        go = threading.Barrier(3)

        def add(n: int, fut: LightFuture = fut, calls: list[int] = calls, go: threading.Barrier = go) -> None:
            go.wait()
            for i in range(20):
                fut.add_done_callback(lambda f, k=n * 100 + i: calls.append(k))

        threads = [threading.Thread(target=add, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        go.wait()
        fut.set_result(1)
        for t in threads:
            t.join(10)
        assert sorted(calls) == sorted(n * 100 + i for n in range(2) for i in range(20))
