"""The scoreboard: one shared memory page of slots, as Apache keeps one.

Made before any fork, so the supervisor, the fork server and every worker see
the same memory.  A worker writes its state and the id of the task it starts
before calling user code; that costs no system call, and tells the supervisor,
after a crash, whether the task had started.

Beside the words, each slot has a result area: the worker builds its RESULTS
frame there (quick results wait a little to travel together) and sends it
from there.  The area is shared, so results a worker computed but had not yet
sent when it died are still there for the supervisor to read: a crash in a
batch of quick tasks fails only the task that was running.

One more shared thing, a memory file with one byte per slot: the record lock
(``fcntl.lockf``) that a worker and the supervisor take around a task that may
be taken back (``prefork._takeback``).
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Final

FREE: Final = 0
BOOTING: Final = 1
IDLE: Final = 2
BUSY: Final = 3
EXITING: Final = 4
#: a self-feeding worker between two requests of a kept-alive connection (``idle(keepalive=True)``):
#: it accepts no other connection, so it is no spare; busy for the census, never retired as idle,
#: never timed as a request (Apache's "K")
KEEPALIVE: Final = 5

# fields of a slot, in int64 words
PID: Final = 0
STATE: Final = 1
TASK: Final = 2  #: id of the last task started (kept after it ends)
STARTED: Final = 3  #: monotonic_ns when that task started
DONE: Final = 4  #: tasks finished by this worker
SINCE: Final = 5  #: monotonic_ns of the last state change
STACKFD: Final = 6  #: the worker's fd (in its own table) where faulthandler dumps its stack
BUFFERED: Final = 7  #: bytes of result records waiting in the slot's result area (not yet sent)
TAKEN: Final = 8  #: id of a task the supervisor took back before the worker started it (0: none)
WORDS: Final = 9

#: bytes of a slot's result area: its RESULTS kind byte, then records; a record that does not
#: fit is sent on its own (after what is buffered), never held
AREA: Final = 128 * 1024


class Scoreboard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, max(mmap.PAGESIZE, slots * WORDS * 8), flags=mmap.MAP_SHARED)
        self.words = memoryview(self._map).cast("q")
        # Untouched pages of an anonymous map cost nothing: a slot's area is only as
        # large in memory as the biggest batch its workers buffered.
        self._areas = mmap.mmap(-1, slots * AREA, flags=mmap.MAP_SHARED)
        self.areas = memoryview(self._areas)
        #: the file whose byte ``slot`` is that slot's claim lock (``prefork._takeback``); inherited
        #: by every worker, never in ``internal_fds``: a POSIX record lock is dropped when its
        #: process closes any descriptor of the file
        self.claims = os.memfd_create("prefork-claims", os.MFD_CLOEXEC)

    def area(self, slot: int) -> memoryview:
        """The slot's result area (see the module text)."""
        return self.areas[slot * AREA : (slot + 1) * AREA]

    def buffered(self, slot: int) -> bytes:
        """The RESULTS frame a worker of ``slot`` had built and not sent (``b""``: none).

        Read after the worker died: what it wrote is all there."""
        n = self.words[slot * WORDS + BUFFERED]
        if n <= 0 or n > AREA - 1:
            return b""
        start = slot * AREA
        return bytes(self.areas[start : start + 1 + n])

    def reset(self, slot: int, pid: int = 0) -> None:
        base = slot * WORDS
        w = self.words
        w[base + PID] = pid
        w[base + STATE] = BOOTING if pid else FREE
        w[base + TASK] = 0
        w[base + STARTED] = 0
        w[base + DONE] = 0
        w[base + SINCE] = time.monotonic_ns()
        w[base + STACKFD] = -1
        w[base + BUFFERED] = 0
        w[base + TAKEN] = 0

    def set_state(self, slot: int, state: int) -> None:
        base = slot * WORDS
        self.words[base + STATE] = state
        self.words[base + SINCE] = time.monotonic_ns()

    def state(self, slot: int) -> int:
        return self.words[slot * WORDS + STATE]

    def since(self, slot: int) -> float:
        return self.words[slot * WORDS + SINCE] / 1e9

    def task(self, slot: int) -> tuple[int, float]:
        """(id of the last task started, its start in monotonic seconds)."""
        base = slot * WORDS
        return self.words[base + TASK], self.words[base + STARTED] / 1e9

    def close(self) -> None:
        self.words.release()
        self._map.close()
        self.areas.release()
        self._areas.close()
        if self.claims >= 0:
            os.close(self.claims)
            self.claims = -1
