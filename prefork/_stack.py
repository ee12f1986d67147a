"""A worker's stack dump as the supervisor shows it (a ``TaskTimeout``'s ``stack``, the
harakiri log): only the worker's own frames.

A worker is a fork: the thread that forked it (the caller that created the pool, or
the fork server) lives on in it, so faulthandler's dump of its main thread goes on
below the worker's entry point with every frame that thread had at the fork: the
spawner, the pool's constructor, the user's functions, their ``<module>``.  None of
them runs in the worker.  The dump is cut below the entry point, ``run_worker``, in
each thread that has it; other threads (started in the worker) are left whole.
"""

from __future__ import annotations

import re
from typing import Final

from prefork._worker import run_worker

# faulthandler's frame line: innermost first, one per frame, two spaces in
_FRAME: Final = re.compile(r'  File "(?P<file>.*)", line \d+ in (?P<name>.*)')


def _as_dumped(text: str) -> str:
    """``text`` as faulthandler writes it: printable ASCII as is, anything else escaped."""
    return "".join(
        c if " " <= c <= "~" else f"\\x{ord(c):02x}" if ord(c) <= 0xFF else
        f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
        for c in text
    )  # fmt: skip


#: the outermost frame of a worker's own, as faulthandler writes it: (file, function)
ENTRY: Final = (_as_dumped(run_worker.__code__.co_filename), run_worker.__code__.co_name)


def own_frames(dump: str, entry: tuple[str, str] = ENTRY) -> str:
    """``dump`` (faulthandler's text, every thread) without the frames below ``entry``."""
    out = []
    inherited = False  # in the frames below the entry point of the current thread
    for line in dump.splitlines(keepends=True):
        if inherited and line.startswith("  "):  # a frame, or faulthandler's "  ..." of a cut-off stack
            continue
        inherited = False
        out.append(line)
        frame = _FRAME.fullmatch(line.rstrip("\n"))
        inherited = frame is not None and (frame["file"], frame["name"]) == entry
    return "".join(out)
