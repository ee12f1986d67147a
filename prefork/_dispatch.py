"""Which queued tasks go to which ready worker, in which frames.  No I/O.

:func:`encode_call` turns a submitted call into its payload (or the error
that is its outcome) once, in the submitting thread.

The supervisor calls :func:`fill` with the ready workers; it gets back the
CALLS frames to send, in order, each a list of ``(task id, payload)``.  A
worker gets at most ``per`` tasks in flight (and no more than its budget, for
``max_tasks_per_child``); the least loaded worker is served first; a frame
stops growing past ``frame_bytes`` so that the worker starts on it while the
next one travels.  Each task is claimed from the sink once (a task sent back
after a death was claimed already), and given to its worker in the ledger
before its frame exists: if the send fails, the death of that worker settles it.

How many tasks per worker is :func:`auto_prefetch`'s call unless set: two for
long and medium tasks (the next is there when one ends), a batch for short
ones (fewer frames, fewer system calls per task).  Long tasks travel in
TAKEABLE frames (:func:`takeable`): a worker that runs out of work gets the
one waiting behind another's slow task (``prefork._takeback``), so the second
task a worker holds is never a hostage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from prefork import _frames
from prefork._pickle_path import find_unserializable
from prefork._task import Task
from prefork._workers import Worker
from prefork.strategies.serializer import Serializer

AUTO_BATCH: Final = 64  #: most tasks in flight per worker when the queue is deep and tasks short
SHORT_TASK: Final = 0.0002  #: tasks shorter than this (moving average, s) are batched
LONG_TASK: Final = 0.005  #: tasks longer than this are sent takeable (``prefork._takeback``)
FRAME_BYTES: Final = 256 * 1024  #: a CALLS frame stops growing past this size (one large call may exceed it)

Items = list[tuple[int, _frames.Payload]]


def encode_call(task: Task, dump_parts: Callable[[Any], list[Any]], serializer: Serializer, limit: int, max_frame: int) -> BaseException | None:
    """Serialize ``task``'s call into ``task.payload``; or the error that is its outcome:
    the pickler's own (``PicklingError``, ``TypeError``...) with a note naming the
    culprit's path, or a ``ValueError`` when the call is larger than ``limit``."""
    try:
        parts = dump_parts((task.method, task.args, task.kwargs))
    except BaseException as exc:
        try:
            where = find_unserializable(task.method, serializer.dumps, "method")
            where = where or find_unserializable(task.args, serializer.dumps, "args")
            where = where or find_unserializable(task.kwargs, serializer.dumps, "kwargs")
        except BaseException:
            where = ""
        at = f" (at {where})" if where else ""
        exc.add_note(f"prefork: task {task.id}: its method or arguments cannot be serialized with {serializer.name!r}{at}")
        return exc
    task.payload = payload = parts[0] if len(parts) == 1 else parts
    size = len(payload) if len(parts) == 1 else _frames.payload_size(payload)
    if size <= limit:
        return None
    what = f"the {_frames.MAX_PAYLOAD} bytes one call can carry"
    if max_frame and max_frame - _frames.CALL_OVERHEAD < _frames.MAX_PAYLOAD:
        what = f"transport.max_frame = {max_frame}"
    return ValueError(f"task {task.id}: its serialized call is {size} bytes, more than {what}")


def auto_prefetch(avg_task: float | None, queued: int, alive: int) -> int:
    """Tasks in flight per worker, from the moving average run time of tasks."""
    alive = alive or 1
    if queued <= alive or avg_task is None:
        return 1
    if avg_task >= SHORT_TASK:
        return 2
    return min(AUTO_BATCH, max(2, -(-queued // alive)))


def takeable(avg_task: float | None, per: int) -> bool:
    """Whether tasks sent now go in TAKEABLE frames: long ones, when a worker may hold
    more than one (the automatic policy's choice; an explicit ``pool.prefetch`` is
    taken as given)."""
    return per > 1 and avg_task is not None and avg_task >= LONG_TASK


def fill(
    queue: deque[Task],
    ready: list[Worker],
    per: int,
    frame_bytes: int,
    claim: Callable[[Task], bool],
    give: Callable[[Worker, Task, float], None],
    fail: Callable[[Task, BaseException], None],
    now: float,
) -> list[tuple[Worker, Items]]:
    """Take tasks from the front of ``queue`` for the ``ready`` workers (see the module text).

    ``claim`` is the sink's (user code: what it raises is that task's outcome,
    through ``fail``); ``give`` records the task as held by the worker."""
    frames: list[tuple[Worker, Items]] = []
    ready.sort(key=lambda w: len(w.inflight))
    payload_size = _frames.payload_size
    overhead = _frames.CALL_OVERHEAD
    for w in ready:
        room = per - len(w.inflight)
        if w.budget > 0:
            room = min(room, w.budget)
        if room <= 0:
            continue
        items: Items = []
        size = 1
        given = 0
        while queue and given + len(items) < room:
            task = queue[0]
            payload = task.payload
            psize = (len(payload) if type(payload) is bytes else payload_size(payload)) + overhead
            if items and size + psize > frame_bytes:
                frames.append((w, items))  # this frame is full: the next one starts
                given += len(items)
                items = []
                size = 1
                continue
            queue.popleft()
            if task.done:
                continue
            if not task.claimed:  # asked once: a re-dispatched task was claimed already
                try:
                    if not claim(task):
                        continue
                except BaseException as exc:  # a sink's claim is user code: its error is this task's outcome
                    exc.add_note(f"prefork: the result sink's claim() of task {task.id} failed")
                    fail(task, exc)
                    continue
                task.claimed = True
            items.append((task.id, payload))
            size += psize
            give(w, task, now)
        if items:
            frames.append((w, items))
            given += len(items)
        if w.budget > 0:
            w.budget -= given
        if not queue:
            break
    return frames


__all__ = ["AUTO_BATCH", "FRAME_BYTES", "LONG_TASK", "SHORT_TASK", "auto_prefetch", "encode_call", "fill", "takeable"]
