"""Submitting to the hosts from anywhere: a ``concurrent.futures.Executor`` on a Redis stream.

::

    with Client("redis://10.0.0.5:6379/0", "thumbnails") as hosts:
        print(hosts.submit("math:factorial", 20).result())
        print(list(hosts.map("operator:add", [1, 2], [10, 20])))

A method is a ``"module:function"`` name the hosts import, or a function (a
module-level one is sent by that name with the plain-data codecs; pickle
codecs send it as it is).  Each client reads its own result stream in one
thread; a task that failed raises :class:`RemoteError` (type, message, the
host's traceback), a dead-lettered one :class:`DeadLettered`.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from prefork.errors import RemoteTaskError
from prefork_redis.broker import Broker
from prefork_redis.errors import BadSignature, BrokerError
from prefork_redis.records import DEAD, ERROR, OK, REJECTED

__all__ = ["Client", "DeadLettered", "DispatcherClient", "RemoteError"]


class RemoteError(RemoteTaskError, BrokerError):
    """A task raised on a host: ``type_name``, ``message`` and the host's
    ``remote_traceback``, as :class:`prefork.RemoteTaskError` carries them."""


class DeadLettered(BrokerError):
    """The task was dead-lettered (delivered ``max_deliveries`` times, or unreadable)."""


class Client(Executor):
    """Submit tasks to every host serving ``app`` on the Redis server at ``url``."""

    def __init__(self, url: str, app: str, *, codec: str = "json", secret: str | bytes | None = None) -> None:
        self.broker = Broker.from_url(url, app, codec=codec, secret=secret)
        self.client_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._futures: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="prefork-redis-results", daemon=True)
        self._reader.start()

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._closed.is_set():
            raise RuntimeError("cannot schedule new tasks after shutdown")
        method: Any = fn
        if not isinstance(fn, str) and self.broker.codec in ("json", "msgpack"):
            method = _name_of(fn)
        task_id = uuid.uuid4().hex
        future: Future[Any] = Future()
        future.task_id = task_id  # type: ignore[attr-defined]  # the id the hosts see, for idempotent effects
        with self._lock:
            self._futures[task_id] = future
        try:
            self.broker.submit(task_id, {"method": method, "args": list(args), "kwargs": kwargs}, self.client_id)
        except BaseException:
            with self._lock:
                self._futures.pop(task_id, None)
            raise
        return future

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                results = self.broker.results(self.client_id, block_ms=500)
            except Exception as exc:  # the server went away: fail what waits, keep trying
                self._fail_all(BrokerError(f"reading results from Redis failed: {exc!r}"))
                self._closed.wait(0.5)
                continue
            for result in results:
                with self._lock:
                    future = self._futures.pop(result.task_id, None)
                if future is None or not future.set_running_or_notify_cancel():
                    continue
                try:
                    self._settle(future, result)
                except Exception as exc:
                    future.set_exception(exc)

    @staticmethod
    def _settle(future: Future[Any], result: Any) -> None:
        if result.status == REJECTED:
            future.set_exception(BadSignature(f"the result of task {result.task_id!r} was rejected: {result.reason}"))
            return
        value = result.decode()
        if result.status == OK:
            future.set_result(value)
        elif result.status == ERROR:
            info = value if isinstance(value, dict) else {"message": repr(value)}
            future.set_exception(
                RemoteError(str(info.get("type", "Error")), str(info.get("message", "")), str(info.get("traceback", "")))
            )
        elif result.status == DEAD:
            future.set_exception(DeadLettered(f"task {result.task_id!r} was dead-lettered: {result.reason or value!r}"))
        else:
            future.set_exception(BrokerError(f"task {result.task_id!r}: unknown result status {result.status!r}"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            waiting = list(self._futures.values())
            self._futures.clear()
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
    ) -> None:
        self.client = Client(url, app, codec=codec, secret=secret)
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
