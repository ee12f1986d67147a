"""The wire format between supervisor and worker, above the transport's framing.

Every frame starts with one kind byte.  Calls and results travel in batches:
one frame carries as many as were ready, so a deep queue costs few syscalls.

    CALLS    kind | (tid:u64 len:u32 payload)*          supervisor -> worker
    TAKEABLE the same as CALLS; each call may be taken back before it starts
             (the worker claims it first: ``prefork._takeback``)
    STOP     kind                                      supervisor -> worker
    READY    kind                                      worker -> supervisor
    RESULTS  kind | (tid:u64 status:u8 t0:f64 t1:f64 len:u32 payload)*
    BOOTFAIL kind | traceback text (utf-8)
    DATA     kind | exitflag:u8 exitcode:i32 | payload  (yell / exit with data)
    LEAVING  kind | reason (utf-8)                      announced voluntary exit
"""

from __future__ import annotations

import struct
from typing import Final

from prefork.strategies import optional

CALLS: Final = 1
STOP: Final = 2
TAKEABLE: Final = 3
READY: Final = 10
RESULTS: Final = 11
BOOTFAIL: Final = 12
DATA: Final = 13
LEAVING: Final = 14

OK: Final = 0
ERROR: Final = 1

_CALL = struct.Struct("<QI")
#: bytes a call adds to a CALLS frame besides its payload
CALL_OVERHEAD: Final = _CALL.size
#: the largest payload one call or result record carries (its length is a u32)
MAX_PAYLOAD = 2**32 - 1
_RESULT = struct.Struct("<QBddI")
_DATA = struct.Struct("<Bi")

CALLS_HEAD: Final = bytes([CALLS])
TAKEABLE_HEAD: Final = bytes([TAKEABLE])
RESULTS_HEAD: Final = bytes([RESULTS])
STOP_FRAME: Final = bytes([STOP])
READY_FRAME: Final = bytes([READY])


#: a payload at least this large travels as its own part of a frame, never joined
BIG_PAYLOAD: Final = 65536

Buffer = bytes | bytearray | memoryview


def coalesce(pieces: list[Buffer]) -> list[Buffer]:
    """The parts of one frame: runs of small pieces joined, large payloads left alone."""
    if len(pieces) <= 1:
        return pieces
    parts: list[Buffer] = []
    run: list[Buffer] = []
    for piece in pieces:
        if len(piece) >= BIG_PAYLOAD:
            if run:
                parts.append(b"".join(run))
                run = []
            parts.append(piece)
        else:
            run.append(piece)
    if run:
        parts.append(b"".join(run))
    return parts


def send_pieces(channel: object, pieces: list[Buffer]) -> None:
    """Send one frame made of ``pieces`` through ``channel``: as parts when it takes
    parts and a piece is large, else joined."""
    send_parts = optional.send_parts(channel)
    if send_parts is not None and any(len(p) >= BIG_PAYLOAD for p in pieces):
        send_parts(coalesce(pieces))
    else:
        channel.send(b"".join(pieces))  # type: ignore[attr-defined]


#: a task's serialized call: one bytes, or parts sent one after the other (large blobs unjoined)
Payload = bytes | list[Buffer]


def payload_size(payload: Payload) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    return sum(len(p) for p in payload)


def call_pieces(items: list[tuple[int, Payload]], takeable: bool = False) -> list[Buffer]:
    """A CALLS (or TAKEABLE) frame as pieces (join them, or :func:`send_pieces`)."""
    pack = _CALL.pack
    pieces: list[Buffer] = [TAKEABLE_HEAD if takeable else CALLS_HEAD]
    for tid, payload in items:
        if type(payload) is bytes:
            pieces.append(pack(tid, len(payload)))
            pieces.append(payload)
        else:
            pieces.append(pack(tid, payload_size(payload)))
            pieces.extend(payload)  # type: ignore[arg-type]  # a list of parts
    return pieces


def decode_calls(frame: Buffer) -> list[tuple[int, memoryview]]:
    """(task id, payload) pairs of a CALLS or TAKEABLE frame; payloads are views into
    ``frame``, not copies."""
    out = []
    unpack = _CALL.unpack_from
    size = _CALL.size
    pos = 1
    view = memoryview(frame)
    end = len(view)
    while pos < end:
        tid, n = unpack(view, pos)
        pos += size
        out.append((tid, view[pos : pos + n]))
        pos += n
    return out


def result_header(tid: int, status: int, t0: float, t1: float, size: int) -> bytes:
    """What precedes a result's payload in a RESULTS frame (``RESULTS_HEAD`` plus records)."""
    return _RESULT.pack(tid, status, t0, t1, size)


def decode_results(frame: Buffer) -> list[tuple[int, int, float, float, memoryview]]:
    """Result records; payloads are views into ``frame``, not copies."""
    out = []
    unpack = _RESULT.unpack_from
    size = _RESULT.size
    pos = 1
    view = memoryview(frame)
    end = len(view)
    while pos < end:
        tid, status, t0, t1, n = unpack(view, pos)
        pos += size
        out.append((tid, status, t0, t1, view[pos : pos + n]))
        pos += n
    return out


def encode_data(payload: bytes, exitcode: int | None) -> bytes:
    return bytes([DATA]) + _DATA.pack(exitcode is not None, exitcode or 0) + payload


def decode_data(frame: bytes) -> tuple[bytes, int | None]:
    has_exit, code = _DATA.unpack_from(frame, 1)
    return frame[1 + _DATA.size :], (code if has_exit else None)
