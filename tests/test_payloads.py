"""The fast paths for large payloads: blobs sent as parts, frames received into a
reused buffer, CALLS frames split by size.  Every byte must arrive as sent."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork import Executor
from prefork.strategies.serializer import CloudpickleSerializer, PickleSerializer
from prefork.strategies.transport import BIG_FRAME, MAP_FRAME

KiB, MiB = 1024, 1024 * 1024
#: sizes on both sides of every threshold: a part of its own, a frame's size cap, the map buffer
EDGES = [0, 1, BIG_FRAME - 100, BIG_FRAME, BIG_FRAME + 1, 256 * KiB + 7, MiB, MAP_FRAME - 50, MAP_FRAME + 3]


def blob(size: int, seed: int) -> bytes:
    """Bytes that differ at every position from one seed to the next."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * (size // 32 + 1)
    return block[:size]


def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def echo_blob(size: int, seed: int) -> bytes:
    return blob(size, seed)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(EDGES), st.sampled_from(EDGES)), min_size=1, max_size=6))
def test_any_mix_of_argument_and_result_sizes_arrives_intact(sizes: list[tuple[int, int]]) -> None:
    with Executor(2) as ex:
        ins = [ex.submit(digest, blob(a, n)) for n, (a, _) in enumerate(sizes)]
        outs = [ex.submit(echo_blob, b, n) for n, (_, b) in enumerate(sizes)]
        for n, ((a, b), fin, fout) in enumerate(zip(sizes, ins, outs, strict=True)):
            assert fin.result(timeout=30) == digest(blob(a, n))
            assert fout.result(timeout=30) == blob(b, n)


def test_large_and_small_tasks_interleaved_keep_every_result_with_its_task() -> None:
    sizes = [3 * MiB, 10, MiB, 70 * KiB, 5 * MiB, 0, 2 * MiB] * 3
    with Executor(2) as ex:
        futures = [ex.submit(digest, blob(size, n)) for n, size in enumerate(sizes)]
        assert [f.result(timeout=60) for f in futures] == [digest(blob(s, n)) for n, s in enumerate(sizes)]


def test_a_mutable_argument_changed_after_submit_does_not_change_the_task() -> None:
    with Executor(1) as ex:
        ex.submit(os.getpid).result(timeout=10)
        buf = bytearray(b"a" * (2 * MiB))
        arr = np.zeros(MiB // 8)
        f1 = ex.submit(digest, buf)
        f2 = ex.submit(np.sum, arr)
        buf[:] = b"b" * len(buf)
        arr += 1
        assert f1.result(timeout=30) == digest(b"a" * (2 * MiB))
        assert f2.result(timeout=30) == 0.0


def test_numpy_arrays_cross_both_ways() -> None:
    arr = np.arange(MiB, dtype=np.float64)
    with Executor(1) as ex:
        doubled = ex.submit(np.multiply, arr, 2).result(timeout=30)
    assert isinstance(doubled, np.ndarray) and np.array_equal(doubled, arr * 2)


@pytest.mark.parametrize("serializer", [CloudpickleSerializer(), PickleSerializer()], ids=lambda s: s.name)
def test_serializers_stream_bytes_blobs_as_their_own_parts_and_copy_mutable_ones(serializer: object) -> None:
    data = b"q" * (BIG_FRAME * 2)
    parts = serializer.dumps_parts((len, (data, bytearray(data)), {}))  # type: ignore[attr-defined]
    assert any(p is data for p in parts)  # the caller's bytes travel as they are
    assert all(type(p) is bytes for p in parts)  # the bytearray was copied
    assert serializer.loads(b"".join(parts)) == (len, (data, bytearray(data)), {})  # type: ignore[attr-defined]


def test_json_serializer_gets_bytes_for_large_payloads() -> None:
    with Executor(1, overrides={"serializer.name": "json", "resolver.name": "import"}) as ex:
        text = "x" * (3 * MiB)
        assert ex._sup.submit("builtins:len", (text,)).result(timeout=30) == len(text)


@pytest.mark.parametrize("max_frame", [0, 100_000])
def test_calls_frames_are_split_by_size_and_respect_max_frame(monkeypatch: pytest.MonkeyPatch, max_frame: int) -> None:
    from prefork import _frames
    from prefork._dispatch import FRAME_BYTES

    frames: list[int] = []
    send_pieces = _frames.send_pieces

    def recording(channel: object, pieces: list[_frames.Buffer]) -> None:
        if pieces[0] == _frames.CALLS_HEAD and os.getpid() == parent:
            frames.append(sum(len(p) for p in pieces))
        send_pieces(channel, pieces)

    parent = os.getpid()
    monkeypatch.setattr(_frames, "send_pieces", recording)
    with Executor(1, overrides={"transport.max_frame": max_frame}) as ex:
        ex.submit(os.getpid).result(timeout=10)
        futures = [ex.submit(digest, blob(30 * KiB, n)) for n in range(60)]
        assert [f.result(timeout=30) for f in futures] == [digest(blob(30 * KiB, n)) for n in range(60)]
    limit = min(max_frame or FRAME_BYTES, FRAME_BYTES)
    assert len(frames) > 2 and max(frames) <= limit
