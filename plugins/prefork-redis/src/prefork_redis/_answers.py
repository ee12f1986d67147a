"""A host's answers: from a finished run (or a refusal) to a result published in Redis.

Two threads publish, and each answer is published by exactly one of them:

- the **fetch loop**, when it is about to call Redis anyway: the answers
  ready by then go in the same round trip as its next fetch
  (:meth:`Broker.exchange <prefork_redis.broker.Broker.exchange>`), so a busy
  host answers and takes new tasks in one round trip, however many;
- the **completer** thread, for answers that come while the fetch loop waits
  in Redis for new tasks (a blocking read it cannot leave early): it publishes
  them at once, in batches, and retries through outages, so a slow Redis never
  stalls the pool's loop.

Which one is decided when an answer arrives (:meth:`Answers.route`), under
the server's lock, from a flag the fetch loop sets, under the same lock, in
the instant it takes the last answers into the round trip that waits
(:meth:`Answers.take_before_wait`).  A task stays held (renewed) until its
answer is published, however long Redis is away; an answer whose lease was
lost meanwhile is dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any, Final

from prefork import WorkerLost
from prefork_redis._consumer import Completion
from prefork_redis._outage import Outage, is_transient
from prefork_redis.errors import GroupMissing
from prefork_redis.records import ERROR, OK, Task

__all__ = ["ANSWER_BATCH", "Answers", "Reply", "error_record"]

log = logging.getLogger("prefork.redis")

#: The most answers the completer publishes in one call.
ANSWER_BATCH: Final = 500


def error_record(exc: BaseException) -> dict[str, str]:
    """An exception as plain data, readable by any codec and any language."""
    text = "".join(traceback.format_exception(exc))
    remote = getattr(exc, "remote_traceback", None)
    return {"type": type(exc).__name__, "message": str(exc), "traceback": remote or text}


class Reply:
    """An answer decided in the supervisor (a malformed task, a method not allowed)."""

    __slots__ = ("status", "value")

    def __init__(self, status: str, value: Any) -> None:
        self.status = status
        self.value = value


class _Answer:
    """One task's outcome on its way out: its ``completion`` once made (None when there
    is nothing to publish: it was released, or its lease lost); ``retried`` once a call
    with it failed."""

    __slots__ = ("completion", "outcome", "retried", "task")

    def __init__(self, task: Task, outcome: Future[Any] | Reply) -> None:
        self.task = task
        self.outcome = outcome
        self.completion: Completion | None = None
        self.retried = False


class Batch:
    """The answers the fetch loop took for one round trip, and their completions."""

    __slots__ = ("answers", "completions")

    def __init__(self) -> None:
        self.answers: list[_Answer] = []
        self.completions: list[Completion] = []


class Answers:
    """The answers of one host (see the module's docstring).

    ``answering`` (entry id -> task) and ``lock`` are the server's: a task is in
    ``answering`` from the end of its run until its answer is published or its
    lease lost.  ``ok`` is called after each call to Redis that succeeded.
    """

    def __init__(
        self,
        broker: Any,
        lock: threading.Lock,
        answering: dict[str, Task],
        outage: Outage,
        ok: Callable[[], None],
        *,
        encoded: bool = False,
    ) -> None:
        self.broker = broker
        self._encoded = encoded  # a run's value is already its result's payload (see serve._Run)
        self._lock = lock
        self._answering = answering
        self._outage = outage
        self._ok = ok
        self._pending: list[_Answer] = []  # for the fetch loop
        self._waiting = False  # the fetch loop waits in Redis: the completer answers
        self._queue: queue.SimpleQueue[_Answer | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._completer = threading.Thread(target=self._complete_loop, name="prefork-redis-complete", daemon=True)
        self._completer.start()

    # -- routing (any thread) -----------------------------------------------------------

    def route(self, task: Task, outcome: Future[Any] | Reply) -> bool:
        """Called with the server's lock held, the task already in ``answering``: True when
        the fetch loop publishes the answer (wake it), False when the completer does
        (call :meth:`hand_over` once the lock is released)."""
        if self._waiting:
            return False
        self._pending.append(_Answer(task, outcome))
        return True

    def hand_over(self, task: Task, outcome: Future[Any] | Reply) -> None:
        self._queue.put(_Answer(task, outcome))

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    # -- the fetch loop's side ------------------------------------------------------------

    def take(self) -> Batch:
        """The answers ready now, as completions (a release is made here, at once)."""
        batch = Batch()
        self._take_into(batch)
        return batch

    def take_before_wait(self, batch: Batch) -> list[Completion]:
        """The fetch loop is about to wait in Redis: the answers ready now join its round
        trip, and the later ones go to the completer until :meth:`stop_waiting`."""
        start = len(batch.completions)
        self._take_into(batch, wait=True)
        return batch.completions[start:]

    def stop_waiting(self) -> None:
        with self._lock:
            self._waiting = False

    def settle(self, batch: Batch, published: list[bool]) -> None:
        """The round trip was answered: ``published[i]`` for each completion."""
        for answer, ok in zip(batch.answers, published, strict=True):
            if not ok:
                _not_published(answer)
        self._forget(batch.answers)

    def undo(self, batch: Batch, exc: BaseException) -> None:
        """The round trip failed, or was interrupted (a signal): its answers are tried again
        first (by the fetch loop, or by :meth:`close`); after :class:`GroupMissing` they
        are dropped (Redis lost their tasks)."""
        if isinstance(exc, GroupMissing):
            self._forget(batch.answers)
            return
        for answer in batch.answers:
            answer.retried = True  # the call may have run
            answer.completion = None
        with self._lock:
            self._pending[:0] = batch.answers

    def drop_all(self) -> None:
        """The group is gone: what waits is dropped with it."""
        with self._lock:
            self._pending.clear()

    def _take_into(self, batch: Batch, wait: bool = False) -> None:
        start = len(batch.answers)
        with self._lock:  # in the batch before out of pending: an interruption loses none
            batch.answers += self._pending
            self._pending.clear()
            self._waiting = wait
        for answer in batch.answers[start:]:
            with self._lock:
                held = answer.task.entry_id in self._answering
            answer.completion = self._completion(answer) if held else None  # not held: its lease was lost
            if answer.completion is not None:
                batch.completions.append(answer.completion)
        gone = [answer for answer in batch.answers[start:] if answer.completion is None]  # released, or lost
        if gone:
            batch.answers[start:] = [answer for answer in batch.answers[start:] if answer.completion is not None]
            self._forget(gone)

    def _forget(self, answers: list[_Answer]) -> None:
        with self._lock:
            for answer in answers:
                self._answering.pop(answer.task.entry_id, None)

    # -- both sides -------------------------------------------------------------------------

    def _completion(self, answer: _Answer) -> Completion | None:
        """The answer as a completion; None after releasing the task (its worker was lost,
        or its run cancelled), which is done here, at once, retried through an outage."""
        status, value = _outcome(answer.task, answer.outcome)
        if status is None:
            self._release(answer.task)
            return None
        encoded = self._encoded and status == OK and not isinstance(answer.outcome, Reply)
        try:
            return answer.task, self.broker.encode_result(answer.task, value, encoded=encoded), status
        except (TypeError, ValueError, OverflowError) as exc:  # the codec cannot carry the result
            task = answer.task
            error = TypeError(f"the result of task {task.task_id!r} cannot be encoded with {task.codec!r}: {exc}")
            return task, self.broker.encode_result(task, error_record(error)), ERROR

    def _release(self, task: Task) -> None:
        while True:
            with self._lock:
                if task.entry_id not in self._answering:
                    return  # renew found the lease lost meanwhile
            try:
                self.broker.release(task.entry_id)
                self._ok()
                return
            except GroupMissing as exc:
                self._ok()
                log.warning("task %s was dropped: %s", task.task_id, exc)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self._closing.wait(self._outage.failed(exc)):
                    log.warning("stopping with task %s not given back (Redis unreachable): "
                                "a host runs it again after the lease", task.task_id)  # fmt: skip
                    return

    # -- the completer thread ---------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Publish what is left (once: not through an outage), then stop the completer."""
        self._closing.set()
        with self._lock:
            left, self._pending = self._pending, []
            self._waiting = True
        for answer in left:
            self._queue.put(answer)
        self._queue.put(None)
        self._completer.join(timeout)

    def _complete_loop(self) -> None:
        """Publish what arrives, in batches: whatever waits when the last batch was
        published goes out in one round trip (one script call), however many tasks."""
        while True:
            batch = [self._queue.get()]
            while len(batch) < ANSWER_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            answers = [answer for answer in batch if answer is not None]
            try:
                self._publish(answers)
            except Exception:
                log.exception("answering %d task(s) failed", len(answers))
            finally:
                self._forget(answers)
            if len(answers) < len(batch):
                return

    def _publish(self, answers: list[_Answer]) -> None:
        """Publish ``answers`` in one call, retrying through outages until done, their
        leases are lost, or the host closes."""
        todo: list[tuple[_Answer, Completion]] = []
        for answer in answers:
            with self._lock:
                if answer.task.entry_id not in self._answering:
                    continue
            completion = self._completion(answer)
            if completion is not None:
                todo.append((answer, completion))
        while todo:
            with self._lock:  # renew may have found leases lost meanwhile
                todo = [item for item in todo if item[0].task.entry_id in self._answering]
            if not todo:
                return
            try:
                published = self.broker.complete_many([completion for _, completion in todo])
            except GroupMissing as exc:
                self._ok()  # Redis answered: without the group (it restarted empty, or the stream was deleted)
                log.warning("the result(s) of %d task(s) were dropped: %s", len(todo), exc)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                for answer, _ in todo:
                    answer.retried = True
                if self._closing.wait(self._outage.failed(exc)):
                    for answer, _ in todo:
                        log.warning("stopping with the answer to task %s unpublished (Redis unreachable): "
                                    "a host runs it again after the lease", answer.task.task_id)  # fmt: skip
                    return
                continue
            self._ok()
            for (answer, _), ok in zip(todo, published, strict=True):
                if not ok:
                    _not_published(answer)
            return


def _outcome(task: Task, outcome: Future[Any] | Reply) -> tuple[str | None, Any]:
    """The answer to publish, ``(status, value)``; status None: release the task."""
    if isinstance(outcome, Reply):
        return outcome.status, outcome.value
    try:
        value = outcome.result()
    except CancelledError:
        return None, None
    except WorkerLost as exc:
        # not this task's fault, maybe: any host may take it now; the reaper
        # dead-letters it after max_deliveries
        log.warning("task %s lost its worker (%s); released", task.task_id, exc)
        return None, None
    except BaseException as exc:
        return ERROR, error_record(exc)
    return OK, value


def _not_published(answer: _Answer) -> None:
    if answer.retried:  # the call before the outage may have published it: the script tells not which
        log.info("task %s: its result was published before the outage, or its lease was lost", answer.task.task_id)
    else:
        log.warning("the result of task %s was discarded: its lease was lost to another host", answer.task.task_id)
