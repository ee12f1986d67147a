"""A pool that nobody references any more shuts down, and says where it was made.

As the standard library's pools do, an :class:`prefork.Executor` dropped without
``shutdown()`` must not keep its workers, fork server, supervisor thread and
descriptors until the interpreter exits.  The supervisor thread references the
:class:`~prefork._supervisor.Supervisor`, so the supervisor is never garbage;
the facade is.  A :func:`weakref.finalize` on the facade (its callback holds
the supervisor, never the facade) asks the supervisor to stop, as
``shutdown(wait=False)`` does: queued tasks still run, so a future the caller
kept still gets its result.  It then warns with a :class:`ResourceWarning`
attributed to the line that made the pool (ignored by the default warning
filters, shown under ``-W default`` or ``-X dev``, as for an unclosed file).

Only the creation site is recorded, as a file name and a line number: a few
frame look-ups, no traceback formatted per pool.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Final

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: the pools started and not yet stopped (supervisors), stopped at interpreter exit
live_pools: weakref.WeakSet[Any] = weakref.WeakSet()
KILL_WAIT: Final = 2.0  #: seconds a stop that a Ctrl-C turned into a kill waits for the teardown


@atexit.register
def _shutdown_all() -> None:
    """At exit, stop the pools still running, waiting for their tasks as the
    standard library's pools do; a pool being killed gets ``KILL_WAIT`` at most.
    A Ctrl-C while waiting kills every pool left (bounded waits), then exits."""
    try:
        for sup in list(live_pools):
            try:
                if sup._force:
                    sup.join(KILL_WAIT)  # killed already (a second Ctrl-C): do not wait for it again
                else:
                    sup.shutdown(wait=True)
            except Exception:
                pass
    except KeyboardInterrupt:
        pools = list(live_pools)  # those not stopped yet
        for sup in pools:
            try:
                sup.shutdown(wait=False, force=True)
            except Exception:
                pass
        end = time.monotonic() + KILL_WAIT
        for sup in pools:
            sup.join(max(0.0, end - time.monotonic()))


def creation_site() -> tuple[str, int]:
    """The file and line of the first caller outside prefork."""
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
    if frame is None:
        return ("<unknown>", 0)
    return (frame.f_code.co_filename, frame.f_lineno)


def watch(owner: object, sup: Any, what: str) -> weakref.finalize[Any, Any]:
    """Stop ``sup`` when ``owner`` is collected; ``detach()`` the result on an explicit shutdown."""
    finalizer = weakref.finalize(owner, _collected, sup, what, creation_site())
    finalizer.atexit = False  # at exit the supervisor's own atexit hook stops every pool
    return finalizer


def _collected(sup: Any, what: str, where: tuple[str, int]) -> None:
    if sup.stopped or sup._closing:
        return  # stopped or stopping already (the pool broke, or the interpreter is exiting)
    try:
        filename, lineno = where
        warnings.warn_explicit(
            f"{what} created at {filename}:{lineno} was never shut down; shutting it down now "
            "(use it in a `with` block or call shutdown())",
            ResourceWarning, filename, lineno, module=_module_name(filename),
        )
    except Exception:
        pass  # an "error" filter, or the warnings machinery gone at interpreter exit: stop it anyway
    finally:
        request_stop(sup)


def _module_name(filename: str) -> str:
    base = os.path.basename(filename)
    return base[:-3] if base.endswith(".py") else base


def request_stop(sup: Any) -> None:
    """``sup.shutdown(wait=False)`` from any thread, never deadlocking.

    A finalizer runs in whatever thread dropped the last reference or ran the
    cyclic collector, possibly the supervisor's own thread in the middle of
    a callback, possibly a thread holding the supervisor's (non-reentrant)
    lock.  When the lock is free, shut down here; when it is held (perhaps by
    this very thread), a short-lived thread does it once the lock is free.
    """
    lock = sup._lock
    if lock.acquire(blocking=False):
        lock.release()  # free: no thread of ours is inside; another one may take it, and will let it go
        sup.shutdown(wait=False)
        return
    try:
        threading.Thread(target=sup.shutdown, kwargs={"wait": False}, name="prefork-finalizer", daemon=True).start()
    except RuntimeError:  # no new threads at interpreter exit: the atexit hook stopped the pools already
        sup._closing = True  # the loop looks at this at least once a second
