"""Submitting to the hosts from anywhere: a ``concurrent.futures.Executor`` on a Redis stream.

::

    with Client("redis://10.0.0.5:6379/0", "thumbnails", secret=KEY) as hosts:
        print(hosts.submit("thumbnails.tasks:resize", "a.png", 64).result())

A method is a name the hosts registered (see :mod:`prefork_redis.allow`), or
a function (a module-level one is sent by its ``module:qualname`` with the
plain-data codecs; object codecs send it as it is).  Every task is signed
with the hosts' key (``secret=`` or ``$PREFORK_REDIS_SECRET``); a client of
hosts that run ``insecure = true`` says ``insecure=True``.  Each client reads
its own result stream in one thread; a task that failed raises
:class:`RemoteError` (type, message, the host's traceback), a dead-lettered
one :class:`DeadLettered`.

Through Redis's outages a client keeps waiting: a submit that cannot reach
Redis is sent again by the result thread (a task id is queued once, however
often it is sent), reads are retried with backoff, and no future fails
because of a failed call.  A future ends otherwise only when:

- Redis lost the task (it restarted without persistence): :class:`TaskLost`;
- Redis stayed unreachable for longer than ``broker_timeout`` (if set):
  :class:`BrokerUnavailable`, which says the outcome is unknown;
- the client is shut down without waiting.

A result whose signature does not verify is logged and ignored: the future
keeps waiting for the genuine one.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Final

from prefork.errors import RemoteTaskError
from prefork_redis._outage import Outage, is_transient
from prefork_redis.broker import Broker, Envelope
from prefork_redis.errors import BrokerError, BrokerUnavailable, TaskLost
from prefork_redis.records import DEAD, ERROR, OK, REJECTED, Result

__all__ = ["Client", "DeadLettered", "DispatcherClient", "RemoteError"]

log = logging.getLogger("prefork.redis.client")

#: How long one read of the result stream waits (ms); the socket timeout must be longer.
READ_BLOCK_MS: Final = 500
#: How often the result thread asks the server's run_id, to notice a restart it did not see fail.
RESTART_CHECK_S: Final = 1.0
#: The most results one read takes.
READ_COUNT: Final = 1000


class RemoteError(RemoteTaskError, BrokerError):
    """A task raised on a host: ``type_name``, ``message`` and the host's
    ``remote_traceback``, as :class:`prefork.RemoteTaskError` carries them."""


class DeadLettered(BrokerError):
    """The task was dead-lettered (delivered ``max_deliveries`` times, expired, or unreadable)."""


class Client(Executor):
    """Submit tasks to every host serving ``app`` on the Redis server at ``url``.

    :param codec: how tasks are encoded (``json``; ``pickle`` and ``cloudpickle`` for hosts that accept them).
    :param secret: the hosts' HMAC key (default ``$PREFORK_REDIS_SECRET``); every task is signed with it.
    :param insecure: no key: send unsigned tasks, to hosts that run ``insecure = true``.
    :param task_ttl_s: a task not started this long after its submit is never started (``DeadLettered``).
    :param broker_timeout: seconds of Redis outage after which waiting futures fail with
        :class:`BrokerUnavailable` (outcome unknown); None (default): wait for Redis, bounded only by
        each ``future.result(timeout)``.
    :param socket_timeout: seconds before a call that Redis does not answer fails (and is retried).
    :param cluster: ``url`` is one node of a Redis Cluster (see ``Broker.from_url``).
    """

    def __init__(
        self,
        url: str,
        app: str,
        *,
        codec: str = "json",
        secret: str | bytes | None = None,
        insecure: bool = False,
        task_ttl_s: int = 3_600,
        broker_timeout: float | None = None,
        socket_timeout: float = 10.0,
        cluster: bool = False,
    ) -> None:
        if broker_timeout is not None and (
            not isinstance(broker_timeout, int | float) or isinstance(broker_timeout, bool) or broker_timeout <= 0
        ):
            raise BrokerError(f"broker_timeout must be None or a positive number of seconds, not {broker_timeout!r}")
        if not isinstance(socket_timeout, int | float) or socket_timeout <= READ_BLOCK_MS / 1000:
            raise BrokerError(
                f"socket_timeout must be longer than the client's read wait ({READ_BLOCK_MS / 1000} s), "
                f"not {socket_timeout!r}"
            )
        self.broker = Broker.from_url(
            url, app, codec=codec, secret=secret, insecure=insecure, task_ttl_s=task_ttl_s,
            socket_timeout=socket_timeout, cluster=cluster,
        )  # fmt: skip
        self.broker_timeout = broker_timeout
        self.client_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.outage = Outage(f"Redis at {self.broker.where}", log)
        self._futures: dict[str, Future[Any]] = {}
        self._sent: dict[str, str | None] = {}  # task id -> entry id (None: an earlier try queued it)
        self._unsent: dict[str, Envelope] = {}  # submitted, not yet queued in Redis: the sender sends them
        self._sending = False  # a thread is sending (submit's, or the sender's)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wake = threading.Event()  # something to send
        self._reader = threading.Thread(target=self._read, name="prefork-redis-results", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send_loop, name="prefork-redis-submit", daemon=True)
        self._sender.start()

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._closed.is_set():
            raise RuntimeError("cannot schedule new tasks after shutdown")
        method: Any = fn
        if not isinstance(fn, str) and self.broker.codec in ("json", "msgpack"):
            method = _name_of(fn)
        task_id = uuid.uuid4().hex
        future: Future[Any] = Future()
        future.task_id = task_id  # type: ignore[attr-defined]  # the id the hosts see, for idempotent effects
        envelope = self.broker.prepare(task_id, {"method": method, "args": list(args), "kwargs": kwargs}, self.client_id)
        with self._lock:
            self._futures[task_id] = future
            self._unsent[task_id] = envelope
            # alone (nothing else waits, nothing is being sent): send it from here, a thread hop
            # less; else the sender thread sends everything waiting in one round trip
            inline = len(self._futures) == 1 and not self._sending and not self.outage.down
            if inline:
                self._sending = True
        if not inline:
            self._wake.set()
            return future
        try:
            self._send_waiting()
        except BaseException as exc:
            if not is_transient(exc):
                self._end(task_id, exc)
                raise
            self.outage.failed(exc)  # the sender retries it
        finally:
            self._done_sending()
        return future

    # -- the result thread ----------------------------------------------------------

    def _send_loop(self) -> None:
        """The sender thread: whatever was submitted meanwhile, queued in one round trip
        (one script call per :data:`~prefork_redis.broker.SEND_BATCH`); through an outage,
        retried with backoff (a task id is queued once, however often it is sent)."""
        while True:
            self._wake.wait()
            if self._closed.is_set():
                return
            self._wake.clear()
            with self._lock:
                if self._sending or not self._unsent:
                    continue  # a submit is sending: it wakes this thread again if more waits
                self._sending = True
            try:
                self._send_waiting()
                self.outage.ok()
            except Exception as exc:  # an outage (or a bug: logged once, and retried as one)
                delay = self.outage.failed(exc)
                self._give_up_if_unreachable()
                self._closed.wait(delay)
            finally:
                self._done_sending()

    def _done_sending(self) -> None:
        """Give up ``_sending``; wake the sender if tasks were submitted meanwhile."""
        with self._lock:
            self._sending = False
            more = bool(self._unsent)
        if more:
            self._wake.set()

    def _send_waiting(self) -> None:
        """Queue every task submitted and not yet queued, oldest first (the caller holds ``_sending``)."""
        with self._lock:
            waiting = [(tid, env) for tid, env in self._unsent.items() if tid in self._futures]
            for tid in [tid for tid in self._unsent if tid not in self._futures]:
                del self._unsent[tid]  # ended (shut down, lost) before it was sent
        if not waiting:
            return
        entry_ids = self.broker.send_many([env for _, env in waiting])
        with self._lock:
            for (task_id, _env), entry_id in zip(waiting, entry_ids, strict=True):
                self._unsent.pop(task_id, None)
                if task_id in self._futures:
                    self._sent[task_id] = entry_id  # None: an earlier try had queued it

    def _read(self) -> None:
        run_id: str | None = None
        next_check = 0.0
        handled: list[str] = []  # results settled, deleted by the next read
        while not self._closed.is_set():
            try:
                if time.monotonic() >= next_check:
                    current = self.broker.server_id()
                    if run_id is not None and current != run_id:
                        self._after_restart()
                    run_id = current
                    next_check = time.monotonic() + RESTART_CHECK_S
                handled = self._read_results(READ_BLOCK_MS, handled)
                self.outage.ok()
            except Exception as exc:  # an outage (or a bug: logged once, and retried as one)
                delay = self.outage.failed(exc)
                next_check = 0.0  # when it answers: has it restarted?
                self._give_up_if_unreachable()
                self._closed.wait(delay)

    def _read_results(self, block_ms: int | None, handled: list[str]) -> list[str]:
        """Delete the results handled before, read, settle; return the ids to delete next.
        A delete that fails (or runs late, after a timeout) never loses a result, and a
        result read twice finds its future gone."""
        results = self.broker.results(self.client_id, block_ms=block_ms, count=READ_COUNT, delete=False,
                                      handled=handled)  # fmt: skip
        self._settle_all(results)
        return [r.entry_id for r in results]

    def _after_restart(self) -> None:
        """Redis restarted: fail, with :class:`TaskLost`, the waiting tasks it has no trace of."""
        with self._lock:
            waiting = len(self._sent)
        log.warning("Redis at %s restarted; checking the %d task(s) waiting for a result", self.broker.where, waiting)
        handled: list[str] = []
        for _ in range(waiting // READ_COUNT + 10):  # what was published before it went down comes first
            handled = self._read_results(None, handled)
            if not handled:
                break
        self.broker.delete_results(self.client_id, handled)
        with self._lock:
            sent = {tid: entry for tid, entry in self._sent.items() if tid in self._futures}
        for task_id in self.broker.missing(sent):
            self._end(task_id, TaskLost(
                f"Redis at {self.broker.where} lost task {task_id!r} (it restarted without its data: no "
                "persistence?): it will not start again, though it may have run, in part or whole, before the loss"
            ))  # fmt: skip

    def _give_up_if_unreachable(self) -> None:
        if self.broker_timeout is None:
            return
        down = self.outage.down_for
        if down <= self.broker_timeout:
            return
        with self._lock:
            waiting = list(self._futures)
        for task_id in waiting:
            self._end(task_id, BrokerUnavailable(
                f"Redis at {self.broker.where} has been unreachable for {down:.1f} s (broker_timeout="
                f"{self.broker_timeout:g} s): the outcome of task {task_id!r} is unknown; it may still run when "
                f"Redis answers again, until it expires (task_ttl_s={self.broker.task_ttl_s} s after its submit)"
            ))  # fmt: skip

    def _end(self, task_id: str, exc: BaseException) -> None:
        with self._lock:
            future = self._futures.pop(task_id, None)
            self._sent.pop(task_id, None)
            self._unsent.pop(task_id, None)
        if future is not None and future.set_running_or_notify_cancel():
            future.set_exception(exc)

    def _settle_all(self, results: list[Result]) -> None:
        for result in results:
            if result.status == REJECTED:
                log.warning("ignored a result for task %r that failed its check (%s): still waiting for the real one",
                            result.task_id, result.reason)  # fmt: skip
                continue
            with self._lock:
                future = self._futures.pop(result.task_id, None)
                self._sent.pop(result.task_id, None)
                self._unsent.pop(result.task_id, None)
            if future is None or not future.set_running_or_notify_cancel():
                continue
            try:
                self._settle(future, result)
            except Exception as exc:
                future.set_exception(exc)

    @staticmethod
    def _settle(future: Future[Any], result: Result) -> None:
        value = result.decode()
        if result.status == OK:
            future.set_result(value)
        elif result.status == ERROR:
            info = value if isinstance(value, dict) else {"message": repr(value)}
            future.set_exception(
                RemoteError(str(info.get("type", "Error")), str(info.get("message", "")), str(info.get("traceback", "")))
            )
        elif result.status == DEAD:
            detail = value.get("detail", "") if isinstance(value, dict) else ""
            why = f"{result.reason}: {detail}" if detail else (result.reason or repr(value))
            future.set_exception(DeadLettered(f"task {result.task_id!r} was dead-lettered: {why}"))
        else:
            future.set_exception(BrokerError(f"task {result.task_id!r}: unknown result status {result.status!r}"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            waiting = list(self._futures.values())
            self._futures.clear()
            self._sent.clear()
            self._unsent.clear()
        for future in waiting:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop submitting; with ``wait``, first wait for the results of what was submitted."""
        if wait and not cancel_futures:
            with self._lock:
                waiting = list(self._futures.values())
            for future in waiting:
                try:
                    future.exception()
                except BaseException:
                    pass
        self._closed.set()
        self._wake.set()
        self._sender.join(5)
        self._reader.join(5)
        self._fail_all(BrokerError("the client was shut down before this task's result came"))


def _name_of(fn: Callable[..., Any]) -> str:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise TypeError(
            f"{fn!r} cannot travel by name with a plain-data codec: give a 'module:function' name the hosts "
            "can import, or use a pickle codec (with a secret)"
        )
    return f"{module}:{qualname}"


class DispatcherClient:
    """The dispatcher profile's ``new_request``, with the hosts behind a Redis stream.

    A request is what :meth:`prefork.Dispatcher.new_request` takes (checked by
    the same function): ``method_name`` (a name the hosts' resolver knows) or
    ``method``, ``params``, ``from`` and ``upon_result``.  As with a local
    dispatcher the method is called as ``method(from, *params)`` and the
    callback gets ``(request, response)`` with ``request["elapsed"]`` set; a
    failure is ``{"error": "Type: message"}``.  Callbacks run in the client's
    result thread.
    """

    def __init__(
        self,
        url: str,
        app: str,
        *,
        upon_result: Callable[[dict[str, Any], Any], Any] | None = None,
        codec: str = "json",
        secret: str | bytes | None = None,
        **options: Any,
    ) -> None:
        """``options`` are :class:`Client`'s: ``insecure``, ``task_ttl_s``, ``broker_timeout``, ``socket_timeout``,
        ``cluster``."""
        self.client = Client(url, app, codec=codec, secret=secret, **options)
        self._upon_result = upon_result

    def new_request(self, request: dict[str, Any]) -> str:
        """Queue a request on the stream; returns its task id."""
        from prefork.dispatcher import parse_request

        method, params, callback = parse_request(request)
        callback = callback or self._upon_result
        start = time.monotonic()
        future = self.client.submit(method, request.get("from"), *params)

        def done(fut: Future[Any]) -> None:
            request["elapsed"] = time.monotonic() - start
            try:
                response = fut.result()
            except RemoteError as exc:
                response = {"error": f"{exc.type_name}: {exc.message}"}
            except BaseException as exc:
                response = {"error": f"{type(exc).__name__}: {exc}"}
            if callback is not None:
                callback(request, response)

        future.add_done_callback(done)
        task_id: str = future.task_id  # type: ignore[attr-defined]
        return task_id

    def shutdown(self, wait: bool = True) -> None:
        self.client.shutdown(wait)

    def __enter__(self) -> DispatcherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
