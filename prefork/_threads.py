"""Joining a thread of prefork's own so that a fork right after it does not count it.

Before Python 3.13, ``Thread.join()`` returns once the thread's Python state is
gone, often before its OS thread has left the kernel (on 3.12 here, after half
of the joins).  A fork in that moment copies a process the kernel still counts
as multi-threaded, and Python 3.12 warns ("This process ... is multi-threaded,
use of fork() may lead to deadlocks in the child") though nothing of that thread
runs any more.  A pool started right after another one shut down would fork
then (docs/reliability.md, "Forking and threads").
"""

from __future__ import annotations

import os
import threading
import time
from typing import Final

#: seconds a joined thread is given to leave the kernel (it takes microseconds; a
#: thread id reused at once by a new thread must not hold the caller long)
EXIT_WAIT: Final = 0.5


def join_thread(thread: threading.Thread, timeout: float | None = None) -> None:
    """``thread.join(timeout)``; once the thread has ended, wait until the kernel
    has let it go too (``/proc/self/task/<tid>`` gone), ``EXIT_WAIT`` seconds at most."""
    thread.join(timeout)
    if thread.is_alive() or thread.native_id is None:
        return
    task = f"/proc/self/task/{thread.native_id}"
    end = time.monotonic() + EXIT_WAIT
    pause = 0.0001
    while os.path.exists(task) and time.monotonic() < end:
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
