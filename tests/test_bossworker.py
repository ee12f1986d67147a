"""prefork.BossWorker: the seed's behaviour point by point, and what it lacks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import prefork
from prefork import BossWorker, ConfigError, PoolShutDown, QueueFull
from prefork.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent
INIT_MARK: list[int] = []


def multiply(job: dict[str, int]) -> dict[str, int]:
    return {"product": job["a"] * job["b"]}


def add_string(result: dict[str, Any]) -> dict[str, Any]:
    result["string"] = f"the answer is: {result.get('product')}"
    result["handled_in"] = os.getpid()
    return result


def rattle(job: Any) -> None:
    raise RuntimeError("rattle")


def echo(job: Any) -> Any:
    return job


def slow_or_not(job: dict[str, Any]) -> Any:
    if job.get("sleep"):
        time.sleep(job["sleep"])
    if job.get("exit") is not None:
        os._exit(job["exit"])
    if job.get("wait_for"):
        end = time.monotonic() + 20
        while not os.path.exists(job["wait_for"]) and time.monotonic() < end:
            time.sleep(0.005)
    return {"pid": os.getpid(), "job": job.get("n")}


def init_worker() -> None:
    INIT_MARK.append(os.getpid())


def report_init(job: Any) -> list[int]:
    return list(INIT_MARK)


def note_exit() -> None:
    with open(os.path.join(os.environ["BW_EXIT_DIR"], str(os.getpid())), "a") as f:
        f.write("exit\n")


def test_the_seed_synopsis_runs_as_written() -> None:
    out = subprocess.run([sys.executable, "examples/boss_worker.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "12\nthe answer is: 12\n"


def test_the_whole_job_configured_from_the_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "prefork", "run", "-c", "examples/boss_worker.toml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "12\nthe answer is: 12\n"


def test_handlers_named_in_a_file(tmp_path: Path) -> None:
    cfg = tmp_path / "prefork.toml"
    cfg.write_text(
        'profile = "boss-worker"\n[boss_worker]\nwork_handler = "tests.test_bossworker:multiply"\n'
        'result_handler = "tests.test_bossworker:add_string"\n[scaling]\nworkers = 2\n'
    )
    with BossWorker(config=cfg) as bw:
        bw.add_work({"a": 6, "b": 7})
        result = bw.get_result(timeout=10)
        assert result["string"] == "the answer is: 42"
        assert result["handled_in"] == os.getpid()  # result_handler runs in the caller
        wait_until(lambda: len(bw.pids()) == 2, what="two workers")


def test_pending_counts_until_results_are_retrieved() -> None:
    with BossWorker(work_handler=multiply, worker_count=2) as bw:
        assert not bw.pending()
        bw.add_work({"a": 1, "b": 2}, {"a": 3, "b": 4})
        bw.add_work({"a": 5, "b": 6})
        assert bw.pending() == 3
        got = []
        while bw.pending():
            got.append(bw.get_result(timeout=10)["product"])
        assert sorted(got) == [2, 12, 30]
        assert bw.get_result() is None  # nothing pending: never blocks


def test_non_blocking_get_returns_none_until_ready(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    with BossWorker(work_handler=slow_or_not, worker_count=1) as bw:
        bw.add_work({"n": 1, "wait_for": str(gate)})
        assert bw.get_result(blocking=False) is None
        assert bw.get_result_nb() is None
        assert bw.pending() == 1
        gate.touch()
        result = wait_until(bw.get_result_nb, what="the result")
        assert result["job"] == 1 and not bw.pending()


def test_a_job_that_raises_gives_an_error_result() -> None:
    with BossWorker(work_handler=rattle, worker_count=1) as bw:
        bw.add_work({})
        result = bw.get_result(timeout=10)
        pid = bw.pids()
    assert result["ERROR"] == "rattle"
    assert result["TYPE"] == "RuntimeError"
    assert "in rattle" in result["TRACEBACK"] and "RuntimeError: rattle" in result["TRACEBACK"]
    assert len(pid) == 1  # the worker was kept


def test_global_timeout_kills_and_replaces_only_that_worker() -> None:
    with BossWorker(work_handler=slow_or_not, worker_count=2, global_timeout=0.3) as bw:
        bw.add_work({"n": 1, "sleep": 10}, {"n": 2})
        results = [bw.get_result(timeout=10) for _ in range(2)]
        errors = [r for r in results if "ERROR" in r]
        assert len(errors) == 1 and "timed out after 0.3 s" in errors[0]["ERROR"]
        assert errors[0]["TYPE"] == "TaskTimeout"
        assert [r["job"] for r in results if "ERROR" not in r] == [2]
        wait_until(lambda: len(bw.pids()) == 2, what="the replacement worker")
        bw.add_work({"n": 3})
        assert bw.get_result(timeout=10)["job"] == 3


def test_a_worker_that_dies_is_replaced_and_its_job_answered() -> None:
    with BossWorker(work_handler=slow_or_not, worker_count=1) as bw:
        bw.add_work({"n": 1, "exit": 7}, {"n": 2})
        first = bw.get_result(timeout=10)
        second = bw.get_result(timeout=10)
        assert "exit code 7" in first["ERROR"] and first["TYPE"] == "WorkerLost"
        assert second["job"] == 2
        assert not bw.pending()


def test_init_handler_once_per_worker_and_exit_handler_as_it_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BW_EXIT_DIR", str(tmp_path))
    bw = BossWorker(work_handler=report_init, init_handler=init_worker, exit_handler=note_exit, worker_count=2)
    try:
        wait_until(lambda: len(bw.pids()) == 2, what="two workers")
        pids = bw.pids()
        bw.add_work(*range(6))
        marks = [bw.get_result(timeout=10) for _ in range(6)]
    finally:
        bw.shut_down()
    assert all(len(m) == 1 and m[0] in pids for m in marks)  # one init in each worker, before its jobs
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == sorted(pids)
    assert {p.read_text() for p in tmp_path.iterdir()} == {"exit\n"}


def test_shut_down_processes_the_queue_and_keeps_results() -> None:
    bw = BossWorker(work_handler=slow_or_not, worker_count=2)
    bw.add_work(*({"n": i, "sleep": 0.01} for i in range(10)))
    bw.shut_down()
    assert bw.pending() == 10
    assert sorted(bw.get_result(timeout=1)["job"] for _ in range(10)) == list(range(10))
    with pytest.raises(PoolShutDown):
        bw.add_work({"n": 11})


def test_forced_shut_down_stops_at_once_and_answers_every_job() -> None:
    bw = BossWorker(work_handler=slow_or_not, worker_count=1)
    bw.add_work(*({"n": i, "sleep": 30} for i in range(3)))
    wait_until(lambda: bw._sup.stats()["busy"] == 1, what="a running job")
    t0 = time.monotonic()
    bw.shut_down(force=True)
    assert time.monotonic() - t0 < 5
    results = [bw.get_result(timeout=1) for _ in range(3)]
    assert all("ERROR" in r for r in results)
    assert any("cancelled" in r["ERROR"] for r in results)
    assert not bw.pending()


def test_ids_match_results_and_order_can_be_kept() -> None:
    with BossWorker(work_handler=slow_or_not, worker_count=2, with_ids=True, ordered=True) as bw:
        ids = bw.add_work(*({"n": i, "sleep": 0.05 * (5 - i)} for i in range(5)))
        got = [bw.get_result(timeout=10) for _ in ids]
    assert [job_id for job_id, _ in got] == ids
    assert [r["job"] for _, r in got] == list(range(5))


def test_unordered_results_come_as_they_finish() -> None:
    with BossWorker(work_handler=slow_or_not, worker_count=2, with_ids=True) as bw:
        slow, fast = bw.add_work({"n": 0, "sleep": 0.5}, {"n": 1})
        assert bw.get_result(timeout=10)[0] == fast
        assert bw.get_result(timeout=10)[0] == slow


def test_max_pending_raises_when_full(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    with BossWorker(work_handler=slow_or_not, worker_count=1, max_pending=2, when_full="raise") as bw:
        bw.add_work({"n": 1, "wait_for": str(gate)}, {"n": 2})
        with pytest.raises(QueueFull, match="max_pending = 2"):
            bw.add_work({"n": 3})
        gate.touch()
        assert {bw.get_result(timeout=10)["job"] for _ in range(2)} == {1, 2}
        bw.add_work({"n": 3})
        assert bw.get_result(timeout=10)["job"] == 3


def test_max_pending_blocks_until_there_is_room(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    with BossWorker(work_handler=slow_or_not, worker_count=1, max_pending=1) as bw:
        bw.add_work({"n": 1, "wait_for": str(gate)})
        added = threading.Event()
        adder = threading.Thread(target=lambda: (bw.add_work({"n": 2}), added.set()))
        adder.start()
        assert not added.wait(0.2)  # blocked: one job outstanding
        gate.touch()
        assert added.wait(10)
        adder.join(10)
        assert sorted(bw.get_result(timeout=10)["job"] for _ in range(2)) == [1, 2]


def test_threads_add_and_collect_at_once() -> None:
    with BossWorker(work_handler=echo, worker_count=2) as bw:
        def add(base: int) -> None:
            for i in range(50):
                bw.add_work(base + i)

        adders = [threading.Thread(target=add, args=(k * 1000,)) for k in range(4)]
        for t in adders:
            t.start()
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 200 and time.monotonic() < deadline:
            r = bw.get_result(timeout=1)
            if r is not None:
                got.append(r)
        for t in adders:
            t.join(10)
    assert sorted(got) == sorted(k * 1000 + i for k in range(4) for i in range(50))


def test_a_job_that_cannot_be_serialized_is_answered_with_an_error() -> None:
    with BossWorker(work_handler=echo, worker_count=1) as bw:
        bw.add_work(threading.Lock(), 5)
        results = [bw.get_result(timeout=10) for _ in range(2)]
    errors = [r for r in results if isinstance(r, dict) and "ERROR" in r]
    assert len(errors) == 1 and "cannot be serialized" in errors[0]["ERROR"]
    assert 5 in results


def test_a_missing_work_handler_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="work_handler is empty"):
        BossWorker()


def test_bad_when_full_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"keyword arguments: boss_worker.when_full = 'drop': must be 'block' or 'raise'"):
        BossWorker(work_handler=echo, when_full="drop")


def test_is_exported() -> None:
    assert prefork.BossWorker is BossWorker


def test_a_job_refused_by_a_broken_pool_is_not_pending_and_get_result_does_not_wait_for_it(tmp_path: Path) -> None:
    """add_work() on a pool that broke raises, and the job it refused counts nowhere:
    pending() falls back to what is really outstanding, get_result() returns at once."""
    import time

    import prefork

    gate = tmp_path / "first job queued"

    def init_fails_once_the_first_job_is_queued() -> None:  # else the pool may break before add_work
        deadline = time.monotonic() + 10
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("init fails")

    boss = BossWorker(abs, init_handler=init_fails_once_the_first_job_is_queued, worker_count=1,
                      overrides={"pool.max_boot_failures": 1})
    try:
        first = boss.add_work(-1)
        gate.touch()
        assert len(first) == 1
        outcome = boss.get_result(timeout=10)  # the pool broke: the first job fails with PoolBroken
        assert isinstance(outcome, dict) and "ERROR" in outcome, outcome
        with pytest.raises(prefork.PoolBroken):
            boss.add_work(-2)
        assert boss.pending() == 0
        t0 = time.monotonic()
        assert boss.get_result() is None
        assert time.monotonic() - t0 < 1.0
    finally:
        boss.shut_down()
