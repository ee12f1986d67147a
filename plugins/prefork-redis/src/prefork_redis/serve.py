"""A prefork pool serving a Redis stream: the supervisor side of the protocol.

``serve(pool)`` is what ``prefork run`` calls with ``app = "prefork_redis:serve"``
and ``[transport] name = "redis"``; it returns when ``stop`` is set, and on
the way out (a signal's exception included) gives back every task it holds.

A task's value is ``{"method": ..., "args": [...], "kwargs": {...}}``: the
method is a name the host registered (see :mod:`prefork_redis.allow`; any
other name is answered with a ``MethodNotAllowed`` error and never reaches a
worker), or a function (object codecs, whose key holders are trusted with
code).  What the loop does, and when:

- fetch: as many tasks as there are free workers, never more;
- every ``lease_ms / 3``: renew the leases of the tasks held (running, or
  whose result is being published; those lost are dropped: their results
  would be fenced off anyway), and reap tasks of dead hosts into the free
  workers;
- a result: published and acked (``Broker.complete_many``) together with the
  next fetch, in one round trip, or by a thread of its own while the fetch
  waits in Redis (see :mod:`prefork_redis._answers`), never by the pool's
  loop, so a slow Redis never stalls it; the task stays held (renewed) until
  its result is published, however long Redis is away;
- a worker died (``WorkerLost``): the task is released at once, for any
  host; after ``max_deliveries`` the reaper dead-letters it;
- Redis unreachable (a restart, a freeze, ``LOADING``...): every call is
  retried with bounded backoff and jitter; the outage is logged once, and its
  end once; tasks keep running.  After an outage the host renews at once and
  waits one lease before reaping others' tasks (each live host renews within
  a third of a lease of Redis coming back), so a short outage does not send
  every running task to a second host;
- the group gone (Redis restarted without persistence): the tasks held are
  dropped (their clients learn that Redis lost them) and the group is made
  again.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from prefork import current_worker
from prefork.config import Config
from prefork.errors import ConfigError
from prefork_redis._answers import Answers, Reply, error_record
from prefork_redis._outage import Outage, is_transient
from prefork_redis.allow import Gate, remote_gate
from prefork_redis.codec import get_codec
from prefork_redis.errors import BrokerError, GroupMissing
from prefork_redis.records import ERROR, Task
from prefork_redis.transport import RedisTransport

__all__ = ["serve", "task_id"]

log = logging.getLogger("prefork.redis")

_current: str | None = None  # in a worker: the id of the Redis task it runs


def task_id() -> str | None:
    """In a worker, the id of the Redis task being run (the client's
    ``future.task_id``): the key for side effects that must happen once, since
    a task may run again on another host.  None outside such a task."""
    return _current


class _Run:
    """A task as a worker runs it, when the pool's serializer carries objects (bytes).

    The payload the client sent travels to the worker untouched, and is
    decoded there with the task's codec; the method (a name is resolved by
    the pool's resolver, as for any task) is called with the task id readable
    through :func:`task_id`; its result is encoded there with the same codec,
    and goes to Redis as it comes back.  The supervisor decoded the payload
    once, to check the method (see :mod:`prefork_redis.allow`), and encodes
    neither the arguments nor the result again.
    """

    __slots__ = ("codec", "task_id")

    def __init__(self, task_id: str, codec: str) -> None:
        self.task_id = task_id
        self.codec = codec  # by name: a codec may not pickle, and each process has them all

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Run, (self.task_id, self.codec))

    def __call__(self, payload: bytes) -> bytes:
        global _current
        codec = get_codec(self.codec)
        method, args, kwargs = _call(codec.loads(payload))
        worker = current_worker()
        fn = worker.resolve(method) if worker is not None else method
        _current = self.task_id
        try:
            result = fn(*args, **kwargs)
        finally:
            _current = None
        try:
            return codec.dumps(result)
        except (TypeError, ValueError, OverflowError) as exc:  # the codec cannot carry the result
            raise TypeError(f"the result of task {self.task_id!r} cannot be encoded with {self.codec!r}: {exc}") from None


def serve(pool: Any, stop: threading.Event | None = None) -> int:
    """Run the tasks of the pool's Redis stream in ``pool`` until ``stop`` is set."""
    transport = pool.config.create("transport")
    if not isinstance(transport, RedisTransport):
        raise BrokerError(
            f"prefork_redis:serve needs [transport] name = \"redis\" in the configuration, not {transport.name!r}"
        )
    gate = _gate(pool.config, transport)
    get_codec(transport.codec)  # prefork's registry, built before the pool forks: its workers find codecs at once
    broker = transport.broker()
    if transport.insecure:
        log.warning(
            "INSECURE: insecure = true: tasks are not signed, so anyone who can write to the Redis server at %s "
            "can submit work to this host (it runs only what the host allows: %s)", broker.where, gate.what,
        )  # fmt: skip
    stop = stop or threading.Event()
    server = _Server(pool, broker, transport.block_ms, gate)
    try:
        if server.start(stop):
            server.run(stop)
    finally:
        server.close()
    return 0


def _gate(config: Config, transport: RedisTransport) -> Gate:
    """What remote tasks may call here; a config error when nothing may be."""
    resolver = config.create("resolver")
    gate = remote_gate(resolver, transport.allow_any_import)
    if transport.allow_any_import:
        log.warning(
            "allow_any_import = true: a remote task may call any function the %r resolver finds, imports included: "
            "whoever can submit tasks can run any code on this host", resolver.name,
        )  # fmt: skip
    elif gate.size == 0 and not get_codec(transport.codec).objects:  # an object codec's tasks may be functions
        source = config.sources.get("resolver.name") or config.sources.get("resolver") or "defaults"
        raise ConfigError(
            f"{source}: resolver.name = {resolver.name!r}: registers no method a remote task may call, and "
            "the redis transport never imports whatever a task names; register them: "
            '[resolver] name = "allow" with allow = ["package.module:*"] or methods = {...} '
            "(or set transport.allow_any_import = true to trust whoever can submit with any code)"
        )
    else:
        log.info("remote tasks may call what %s registers", gate.what)
    return gate


class _Server:
    def __init__(self, pool: Any, broker: Any, block_ms: int, gate: Gate) -> None:
        self.pool = pool
        self.broker = broker
        self.block_ms = block_ms
        self.gate = gate
        self.running: dict[str, tuple[Task, Future[Any]]] = {}  # entry id -> (task, future): a worker runs it
        self.answering: dict[str, Task] = {}  # entry id -> task: its answer is being published
        # a pool whose serializer carries objects (bytes) gets each payload as it came, in a _Run
        self._passthrough = bool(pool.config.create("serializer").objects)
        self._lock = threading.Lock()
        self._freed = threading.Event()  # a task ended, or an answer waits: the fetch loop has work
        self.outage = Outage(f"Redis at {broker.where}", log)
        self.answers = Answers(broker, self._lock, self.answering, self.outage, self._ok, encoded=self._passthrough)
        self._next_tick = 0.0
        self._reap_after = 0.0

    # -- the fetch loop (the caller's thread) ---------------------------------------

    def start(self, stop: threading.Event) -> bool:
        """Set up the consumer, waiting out an outage; False when stopped first."""
        while not stop.is_set():
            try:
                self.broker.setup()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                stop.wait(self.outage.failed(exc))
                continue
            self._ok()
            return True
        return False

    def run(self, stop: threading.Event) -> None:
        every = self.broker.lease_ms / 3000
        while not stop.is_set():
            try:
                self._step(every)
            except GroupMissing as exc:
                self._ok()
                self._lose_everything(exc)  # the next fetch makes the group again
            except Exception as exc:
                if not is_transient(exc):
                    raise
                stop.wait(self.outage.failed(exc))

    def _step(self, every: float) -> None:
        """One round trip: the answers ready go out with the fetch for the free workers."""
        if time.monotonic() >= self._next_tick:
            self._tick()
            self._next_tick = time.monotonic() + every
        self._freed.clear()
        free = self._free()
        if not free and not self.answers.pending:  # every worker busy: wait for one (or the next tick)
            self._freed.wait(max(0.0, min(0.2, self._next_tick - time.monotonic())))  # 0.2: notice stop
            return
        batch = self.answers.take()
        try:
            if free:
                wait = max(1, min(self.block_ms, int((self._next_tick - time.monotonic()) * 1000)))
                published, tasks = self.broker.exchange(
                    batch.completions, free, block_ms=wait, before_wait=lambda: self.answers.take_before_wait(batch)
                )  # fmt: skip
            else:
                published, tasks = self.broker.complete_many(batch.completions), []
        except BaseException as exc:
            self.answers.undo(batch, exc)
            raise
        finally:
            self.answers.stop_waiting()
        self._ok()
        self.answers.settle(batch, published)
        self._start(tasks)

    def _ok(self) -> None:
        """A call to Redis succeeded: if that ends an outage, renew at once and hold off reaping for a lease."""
        if self.outage.ok() is not None:
            self._next_tick = 0.0
            self._reap_after = time.monotonic() + self.broker.lease_ms / 1000

    def _free(self) -> int:
        with self._lock:
            workers: int = self.pool.stats()["workers"]
            return max(0, workers - len(self.running))

    def _tick(self) -> None:
        with self._lock:
            held = [*self.running, *self.answering]
        lost_ids = self.broker.renew(held)  # renewing nothing still keeps this host alive
        self._ok()
        for entry_id in lost_ids:
            with self._lock:
                lost = self.running.pop(entry_id, None)
                answering = self.answering.pop(entry_id, None)
            if lost is not None:
                log.warning("lost the lease of task %s (entry %s): another host runs it", lost[0].task_id, entry_id)
                lost[1].cancel()
            elif answering is not None:  # a completion whose reply was lost may have published it
                log.warning("lost the lease of task %s (entry %s) before its answer was published: another host "
                            "took it, or a call whose reply was lost published it", answering.task_id, entry_id)  # fmt: skip
        if time.monotonic() < self._reap_after:
            return
        free = self._free()
        if free:
            self._start(self.broker.reap(free))

    def _start(self, tasks: list[Task]) -> None:
        for task in tasks:
            with self._lock:
                if task.entry_id in self.running or task.entry_id in self.answering:
                    continue  # already held here: keep that run
            try:
                method, args, kwargs = _call(task.decode())
            except Exception as exc:
                self._answer(task, Reply(ERROR, error_record(exc)))
                continue
            if isinstance(method, str) and not self.gate.permits(method):
                log.warning("refused task %s: method %r is not allowed here", task.task_id, method)
                self._answer(task, Reply(ERROR, {
                    "type": "MethodNotAllowed",
                    "message": f"method {method!r} is not allowed on this host: a remote task may call only what "
                               "the host registers (see 'Threat model' in docs/scale-out.md)",
                    "traceback": "",
                }))  # fmt: skip
                continue
            if self._passthrough:
                future = self.pool.submit(_Run(task.task_id, task.codec), task.payload)
            else:
                future = self.pool.submit(method, *args, **kwargs)
            with self._lock:
                self.running[task.entry_id] = (task, future)
            future.add_done_callback(lambda fut, task=task: self._finished(task, fut))

    def _finished(self, task: Task, future: Future[Any]) -> None:
        """A task's run ended (the pool's thread): its worker is free at once, and its
        answer goes to whichever thread publishes it, unless its lease was lost meanwhile."""
        with self._lock:
            held = self.running.get(task.entry_id)
            if held is None or held[1] is not future:
                return  # its lease was lost (the entry may run here again, as another run)
            del self.running[task.entry_id]
            self._answer_locked(task, future)

    def _answer(self, task: Task, outcome: Reply) -> None:
        with self._lock:
            self._answer_locked(task, outcome)

    def _answer_locked(self, task: Task, outcome: Future[Any] | Reply) -> None:
        self.answering[task.entry_id] = task
        if self.answers.route(task, outcome):
            self._freed.set()
        else:  # the fetch loop waits in Redis: the completer publishes it now
            self.answers.hand_over(task, outcome)

    def _lose_everything(self, exc: BaseException) -> None:
        with self._lock:
            held = list(self.running.values())
            count = len(held) + len(self.answering)
            self.running.clear()
            self.answering.clear()
        self.answers.drop_all()
        for _task, fut in held:
            fut.cancel()
        log.warning("%s; dropping the %d task(s) held here (Redis lost them: their clients are told so)", exc, count)

    def close(self) -> None:
        """Give back what is still held (a stop while tasks run), publish the answers
        ready, and leave the group."""
        with self._lock:
            held = list(self.running.values())
            self.running.clear()
        kept = 0  # tasks not given back: Redis is unreachable
        for task, fut in held:
            fut.cancel()
            if kept:
                kept += 1
                continue
            try:
                self.broker.release(task.entry_id)
            except Exception as exc:
                if is_transient(exc):
                    kept += 1
                else:
                    log.exception("releasing task %s failed", task.task_id)
        if kept:
            log.warning("could not give back %d task(s): Redis is unreachable; hosts take them after the lease", kept)
        self.answers.close()
        try:
            self.broker.leave()
        except Exception as exc:
            if not is_transient(exc):
                log.exception("leaving the consumer group failed")
        self.broker.close()


def _call(value: Any) -> tuple[Any, list[Any], dict[str, Any]]:
    """``{"method", "args", "kwargs"}`` checked, with errors that say what was wrong."""
    if not isinstance(value, dict) or "method" not in value:
        raise ValueError(f'a task is {{"method": ..., "args": [...], "kwargs": {{...}}}}, not {value!r:.200}')
    method, args, kwargs = value["method"], value.get("args", []), value.get("kwargs", {})
    if not (isinstance(method, str) or callable(method)):
        raise ValueError(f"a task's method is a 'module:function' name or a function, not {method!r:.200}")
    if not isinstance(args, (list, tuple)):
        raise ValueError(f"a task's args are a list, not {args!r:.200}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"a task's kwargs are a map of names, not {kwargs!r:.200}")
    return method, list(args), kwargs
