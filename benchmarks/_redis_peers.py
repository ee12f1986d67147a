"""The Redis task queues bench_redis.py measures prefork-redis beside: rq, arq and taskiq-redis.

Each peer runs the same no-op task (``a + b``) on the same redis-server, with
workers of its own started as separate processes, and a client in the
benchmark's process.  Their workers import this module (the benchmark puts
its folder on ``PYTHONPATH``), so it imports a peer only when asked:

- **rq** (``rq worker -w rq.worker.SimpleWorker``, one process per worker):
  jobs run in the worker process.  rq's default worker forks a child per
  job, about a hundred times slower for a no-op; ``SimpleWorker`` is rq's
  fastest.  Submit: ``Queue.enqueue_many`` (one pipeline); wait:
  ``Job.latest_result(timeout)`` (a blocking read of the job's result stream).
- **arq** (``arq _redis_peers.ArqSettings``, one process per worker, each
  running up to 10 jobs at once, arq's default): an ``async def`` task.
  ``poll_delay`` is 0.01 s instead of arq's default 0.5 s (a worker looks
  for jobs once per poll).  Submit: ``enqueue_job``, 100 at a time with
  ``asyncio.gather``; wait: ``Job.result(poll_delay=0.01)``.
- **taskiq-redis** (``taskiq worker _redis_peers:taskiq_broker --workers N``:
  one command, N worker processes): ``RedisStreamBroker`` (Redis Streams, a
  consumer group, like prefork-redis) and ``RedisAsyncResultBackend``, an
  ``async def`` task.  Submit: ``kiq``, 100 at a time with ``asyncio.gather``;
  wait: ``wait_result(check_interval=0.01)``.

The peers are optional: one that is not installed is skipped with a note
(``pip install -r benchmarks/requirements.txt``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: The Redis server and queue of a peer's workers, given to them in their environment.
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_PEER_QUEUE", "bench")
#: The waits of the polling peers (seconds): their default is 0.5 s (arq) and 0.2 s (taskiq).
POLL_S = 0.01
#: How many submits an asyncio peer has in flight at once.
GATHER = 100


def rq_add(a: int, b: int) -> int:
    return a + b


async def arq_add(ctx: Any, a: int, b: int) -> int:
    return a + b


if "arq" in os.environ.get("BENCH_PEER", "") and importlib.util.find_spec("arq"):
    from arq.connections import RedisSettings

    class ArqSettings:
        """The arq workers' settings (``arq _redis_peers.ArqSettings``)."""

        functions = [arq_add]
        redis_settings = RedisSettings.from_dsn(URL)
        queue_name = QUEUE
        poll_delay = POLL_S


if "taskiq" in os.environ.get("BENCH_PEER", "") and importlib.util.find_spec("taskiq_redis"):
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    taskiq_broker = RedisStreamBroker(URL, queue_name=QUEUE).with_result_backend(RedisAsyncResultBackend(URL))

    @taskiq_broker.task(task_name="taskiq_add")
    async def taskiq_add(a: int, b: int) -> int:
        return a + b


class Peer:
    """One peer: its workers (``start``/``stop``), ``throughput`` and ``latency``."""

    name = ""
    module = ""  # the package that must be importable
    how = ""  # how its workers were started, for the report

    def __init__(self, url: str, queue: str, workers: int) -> None:
        self.url, self.queue, self.workers = url, queue, workers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, BENCH_REDIS_URL=url, BENCH_PEER_QUEUE=queue, BENCH_PEER=self.name)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), self.env.get("PYTHONPATH", "")) if p)

    @classmethod
    def installed(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    def commands(self) -> list[list[str]]:
        raise NotImplementedError

    def start(self, cwd: Path) -> None:
        for command in self.commands():
            self.procs.append(subprocess.Popen(
                command, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs:  # SIGINT: what each one's CLI stops on cleanly
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def throughput(self, tasks: int) -> float:
        """``tasks`` no-op tasks submitted at once, then each result waited for: tasks/s."""
        raise NotImplementedError

    def latency(self, trips: int) -> list[float]:
        """``trips`` sequential tasks, submit to result: each in ms."""
        raise NotImplementedError


class RQ(Peer):
    name = "rq"
    module = "rq"
    how = "rq worker -w rq.worker.SimpleWorker (a process per worker, no fork per job)"

    def commands(self) -> list[list[str]]:
        cli = "from rq.cli import main; main()"
        rq = [sys.executable, "-c", cli, "worker", "-w", "rq.worker.SimpleWorker", "-u", self.url, self.queue]
        return [rq for _ in range(self.workers)]

    def _queue(self) -> Any:
        import redis
        from rq import Queue

        return Queue(self.queue, connection=redis.Redis.from_url(self.url))

    def throughput(self, tasks: int) -> float:
        from rq import Queue

        queue = self._queue()
        queue.enqueue(rq_add, 0, 0).latest_result(timeout=60)  # every worker up
        start = time.perf_counter()
        jobs = queue.enqueue_many([Queue.prepare_data(rq_add, (i, 1)) for i in range(tasks)])
        values = [_rq_value(job) for job in jobs]
        elapsed = time.perf_counter() - start
        assert values == [i + 1 for i in range(tasks)], "rq: wrong results"
        return tasks / elapsed

    def latency(self, trips: int) -> list[float]:
        queue = self._queue()
        _rq_value(queue.enqueue(rq_add, 0, 0))
        samples = []
        for i in range(trips):
            start = time.perf_counter()
            assert _rq_value(queue.enqueue(rq_add, i, 1)) == i + 1
            samples.append((time.perf_counter() - start) * 1000)
        return samples


def _rq_value(job: Any) -> Any:
    result = job.latest_result(timeout=60)
    if result is None:
        raise TimeoutError("rq: no result within 60 s")
    return result.return_value


class Arq(Peer):
    name = "arq"
    module = "arq"
    how = f"arq _redis_peers.ArqSettings (a process per worker, 10 jobs at once each, poll_delay={POLL_S} s)"

    def commands(self) -> list[list[str]]:
        arq = [sys.executable, "-m", "arq", "_redis_peers.ArqSettings"]
        return [arq for _ in range(self.workers)]

    def _run(self, body: Callable[[Any], Any]) -> Any:
        from arq import create_pool
        from arq.connections import RedisSettings

        async def main() -> Any:
            pool = await create_pool(RedisSettings.from_dsn(self.url), default_queue_name=self.queue)
            try:
                job: Any = await pool.enqueue_job("arq_add", 0, 0)
                await job.result(timeout=60, poll_delay=POLL_S)  # every worker up
                return await body(pool)
            finally:
                await pool.aclose()

        return asyncio.run(main())

    def throughput(self, tasks: int) -> float:
        async def body(pool: Any) -> float:
            start = time.perf_counter()
            jobs: list[Any] = []
            for first in range(0, tasks, GATHER):
                batch = range(first, min(tasks, first + GATHER))
                jobs += await asyncio.gather(*(pool.enqueue_job("arq_add", i, 1) for i in batch))
            values = [await job.result(timeout=60, poll_delay=POLL_S) for job in jobs]
            elapsed = time.perf_counter() - start
            assert values == [i + 1 for i in range(tasks)], "arq: wrong results"
            return tasks / elapsed

        rate: float = self._run(body)
        return rate

    def latency(self, trips: int) -> list[float]:
        async def body(pool: Any) -> list[float]:
            samples = []
            for i in range(trips):
                start = time.perf_counter()
                job: Any = await pool.enqueue_job("arq_add", i, 1)
                assert await job.result(timeout=60, poll_delay=POLL_S) == i + 1
                samples.append((time.perf_counter() - start) * 1000)
            return samples

        samples: list[float] = self._run(body)
        return samples


class Taskiq(Peer):
    name = "taskiq-redis"
    module = "taskiq_redis"

    @property
    def how(self) -> str:  # type: ignore[override]
        return f"taskiq worker _redis_peers:taskiq_broker --workers {self.workers} (RedisStreamBroker)"

    def commands(self) -> list[list[str]]:
        taskiq = [sys.executable, "-m", "taskiq", "worker", "_redis_peers:taskiq_broker", "--workers", str(self.workers)]
        return [taskiq]

    def _run(self, body: Callable[[Any], Any]) -> Any:
        from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

        broker = RedisStreamBroker(self.url, queue_name=self.queue).with_result_backend(RedisAsyncResultBackend(self.url))
        add = broker.register_task(_taskiq_stub, task_name="taskiq_add")

        async def main() -> Any:
            await broker.startup()
            try:
                await (await add.kiq(0, 0)).wait_result(timeout=60, check_interval=POLL_S)  # every worker up
                return await body(add)
            finally:
                await broker.shutdown()

        return asyncio.run(main())

    def throughput(self, tasks: int) -> float:
        async def body(add: Any) -> float:
            start = time.perf_counter()
            handles: list[Any] = []
            for first in range(0, tasks, GATHER):
                handles += await asyncio.gather(*(add.kiq(i, 1) for i in range(first, min(tasks, first + GATHER))))
            values = [(await h.wait_result(timeout=60, check_interval=POLL_S)).return_value for h in handles]
            elapsed = time.perf_counter() - start
            assert values == [i + 1 for i in range(tasks)], "taskiq-redis: wrong results"
            return tasks / elapsed

        rate: float = self._run(body)
        return rate

    def latency(self, trips: int) -> list[float]:
        async def body(add: Any) -> list[float]:
            samples = []
            for i in range(trips):
                start = time.perf_counter()
                result = await (await add.kiq(i, 1)).wait_result(timeout=60, check_interval=POLL_S)
                assert result.return_value == i + 1
                samples.append((time.perf_counter() - start) * 1000)
            return samples

        samples: list[float] = self._run(body)
        return samples


async def _taskiq_stub(a: int, b: int) -> int:  # the client's handle on the workers' taskiq_add
    return a + b


PEERS: tuple[type[Peer], ...] = (RQ, Arq, Taskiq)
