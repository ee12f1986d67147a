"""In a worker: the RESULTS frame in the making, kept in the worker's scoreboard
slot (shared memory) so that results finished before a crash survive it.

The call loop (``prefork._worker``) adds one record per task and flushes the
frame to its channel; after a worker's death the supervisor reads what the area
still holds (``prefork._worker_io``).  See "Results survive the worker" in
docs/design.md.
"""

from __future__ import annotations

from typing import Any

from prefork import _frames, _scoreboard
from prefork.strategies.transport import ChildChannel

__all__ = ["ResultBuffer"]


class ResultBuffer:
    """The worker's RESULTS frame in the making, built in its scoreboard slot's
    shared result area rather than in private memory.

    A record counts as buffered only once it is whole (the slot's BUFFERED word
    is written after its bytes), and stops counting only after the frame was
    handed to the channel.  A worker killed at any instant therefore leaves every
    result it computed either in its channel or in the area, where the supervisor
    reads it after the death (both, at worst: it keeps the first).  A record too
    large for the area goes out at once, as its own frame, after what was buffered.
    """

    __slots__ = ("_area", "_channel", "_index", "_send_parts", "_words", "size")

    def __init__(self, board: _scoreboard.Scoreboard, slot: int, channel: ChildChannel) -> None:
        self._area = board.area(slot)
        self._area[0] = _frames.RESULTS
        self._words = board.words
        self._index = slot * _scoreboard.WORDS + _scoreboard.BUFFERED
        self._channel = channel
        self._send_parts = getattr(channel, "send_parts", None)
        self.size = 0  #: bytes of records buffered

    def add(self, record: tuple[Any, ...]) -> int:
        """Buffer (or send) one result record; returns the bytes buffered before it."""
        before = self.size
        n = len(record[0]) + len(record[1]) if len(record) == 2 else sum(map(len, record))
        if before + n >= _scoreboard.AREA:
            if before:
                self.flush()
                before = 0
            if n >= _scoreboard.AREA:
                _frames.send_pieces(self._channel, [_frames.RESULTS_HEAD, *record])
                return 0
        area = self._area
        pos = 1 + before
        if len(record) == 2:  # the common record: header and one payload
            head, payload = record
            mid = pos + len(head)
            area[pos:mid] = head
            area[mid : pos + n] = payload
        else:
            for piece in record:
                end = pos + len(piece)
                area[pos:end] = piece
                pos = end
        self.size = before + n
        self._words[self._index] = self.size  # after the bytes: a counted record is whole
        return before

    def flush(self) -> None:
        frame = self._area[: 1 + self.size]
        if self._send_parts is not None and self.size >= _frames.BIG_PAYLOAD:
            self._send_parts([frame])  # no copy of a large batch
        else:
            self._channel.send(bytes(frame))  # a small one: one copy, one plain send
        self._words[self._index] = 0  # after the send: an unsent record is never forgotten
        self.size = 0
