"""The wire format between supervisor and worker, above the transport's framing.

Every frame starts with one kind byte.  Calls and results travel in batches:
one frame carries as many as were ready, so a deep queue costs few syscalls.

    CALLS    kind | (tid:u64 len:u32 payload)*          supervisor -> worker
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

CALLS: Final = 1
STOP: Final = 2
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
RESULTS_HEAD: Final = bytes([RESULTS])
STOP_FRAME: Final = bytes([STOP])
READY_FRAME: Final = bytes([READY])


def encode_calls(items: list[tuple[int, bytes]]) -> bytes:
    pack = _CALL.pack
    parts = [CALLS_HEAD]
    for tid, payload in items:
        parts.append(pack(tid, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def decode_calls(frame: bytes) -> list[tuple[int, bytes]]:
    out = []
    unpack = _CALL.unpack_from
    size = _CALL.size
    pos = 1
    end = len(frame)
    while pos < end:
        tid, n = unpack(frame, pos)
        pos += size
        out.append((tid, frame[pos : pos + n]))
        pos += n
    return out


def encode_result(tid: int, status: int, t0: float, t1: float, payload: bytes) -> bytes:
    """One result record; a RESULTS frame is ``RESULTS_HEAD`` plus records."""
    return _RESULT.pack(tid, status, t0, t1, len(payload)) + payload


def decode_results(frame: bytes) -> list[tuple[int, int, float, float, bytes]]:
    out = []
    unpack = _RESULT.unpack_from
    size = _RESULT.size
    pos = 1
    end = len(frame)
    while pos < end:
        tid, status, t0, t1, n = unpack(frame, pos)
        pos += size
        out.append((tid, status, t0, t1, frame[pos : pos + n]))
        pos += n
    return out


def encode_data(payload: bytes, exitcode: int | None) -> bytes:
    return bytes([DATA]) + _DATA.pack(exitcode is not None, exitcode or 0) + payload


def decode_data(frame: bytes) -> tuple[bytes, int | None]:
    has_exit, code = _DATA.unpack_from(frame, 1)
    return frame[1 + _DATA.size :], (code if has_exit else None)
