"""Length-prefixed framing: chunking never changes the payloads; oversize is refused early."""

from __future__ import annotations

import tracemalloc
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.wire import FrameDecoder, WireError, frame
from p2pfl.wire.framing import COALESCE_BELOW, Part, PartAssembler, frame_header, split_parts


def _drain(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (payload := decoder.next_frame()) is not None:
        out.append(payload)
    return out


def test_frame_layout_is_big_endian_length_then_payload() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert frame_header(0x01020304) == b"\x01\x02\x03\x04"


def test_byte_by_byte_feed_yields_every_payload() -> None:
    payloads = [b"hello", b"", b"x" * 1000, bytes(range(256))]
    stream = b"".join(frame(p) for p in payloads)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got.extend(_drain(decoder))
    assert got == payloads
    assert decoder.buffered == 0


def test_wants_counts_missing_bytes() -> None:
    decoder = FrameDecoder()
    assert decoder.wants() == 4
    decoder.feed(b"\x00\x00")
    assert decoder.wants() == 2
    decoder.feed(b"\x00\x05ab")
    assert decoder.next_frame() is None
    assert decoder.wants() == 3
    decoder.feed(b"cde")
    assert decoder.next_frame() == b"abcde"
    assert decoder.wants() == 4


def test_oversize_header_is_refused_before_any_payload_byte() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.feed(frame_header(1001))
    with pytest.raises(WireError) as info:
        decoder.next_frame()
    assert info.value.reason == "oversize"
    assert "1001" in info.value.detail
    assert decoder.buffered == 4


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    decoder.feed(frame(b"0123456789"))
    assert decoder.next_frame() == b"0123456789"


def test_huge_announced_length_is_refused_with_default_limit() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(WireError, match="oversize"):
        decoder.next_frame()


def test_payload_is_an_independent_copy() -> None:
    decoder = FrameDecoder()
    source = bytearray(frame(b"abc") + frame(b"def"))
    decoder.feed(source)
    first = decoder.next_frame()
    source[4:7] = b"zzz"
    decoder.feed(b"more")
    assert first == b"abc"
    assert decoder.next_frame() == b"def"


@settings(deadline=None, max_examples=200)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20),
)
def test_random_chunking_yields_the_same_payloads(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = FrameDecoder(max_frame_size=300)
    got: list[bytes] = []
    for start, end in pairwise(bounds):
        decoder.feed(memoryview(stream)[start:end])
        got.extend(_drain(decoder))
    assert got == payloads
    assert decoder.buffered == 0


@settings(deadline=None, max_examples=40)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3 * COALESCE_BELOW), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=12 * COALESCE_BELOW), max_size=12),
    kinds=st.lists(st.sampled_from([bytes, bytearray, memoryview]), min_size=1),
)
def test_large_frames_across_mixed_chunk_types(
    sizes: list[int], cuts: list[int], kinds: list[type]
) -> None:
    payloads = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    stream = b"".join(frame(p) for p in payloads)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i, (start, end) in enumerate(pairwise(bounds)):
        chunk = kinds[i % len(kinds)](stream[start:end])
        decoder.feed(chunk)
        if isinstance(chunk, bytearray):
            chunk[:] = b"\xee" * len(chunk)  # the caller reuses its buffer
        got.extend(_drain(decoder))
    assert got == payloads
    assert decoder.buffered == 0


def test_a_chunk_that_is_exactly_the_payload_is_returned_without_copy() -> None:
    payload = bytes(range(256)) * 1000
    decoder = FrameDecoder()
    decoder.feed(frame_header(len(payload)))
    decoder.feed(payload)
    assert decoder.next_frame() is payload


def test_memoryview_of_non_byte_items_counts_bytes() -> None:
    values = np.arange(5, dtype=np.float32)
    decoder = FrameDecoder()
    decoder.feed(frame_header(values.nbytes))
    decoder.feed(values.data)
    assert decoder.next_frame() == values.tobytes()


def test_trickled_bytes_are_coalesced() -> None:
    """One-byte feeds must not cost one Python object each (slow-loris memory)."""
    n = 50_000
    decoder = FrameDecoder()
    decoder.feed(frame_header(n))
    byte = b"\x07"
    tracemalloc.start()
    try:
        for _ in range(n - 1):
            decoder.feed(byte)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * n  # one object per byte would be ~35 bytes each
    assert decoder.next_frame() is None
    decoder.feed(byte)
    assert decoder.next_frame() == byte * n


# --- messages in parts -------------------------------------------------------------


def _parted(message: bytes, part_size: int) -> list[bytes]:
    return [
        frame_header(end - start, part, len(message)) + message[start:end]
        for part, start, end in split_parts(len(message), part_size)
    ]


def _messages(decoder: FrameDecoder, assembler: PartAssembler) -> list[bytes]:
    out = []
    while True:
        payload = decoder.next_frame()
        if payload is None:
            return out
        assembler.expect(decoder.part, len(payload), decoder.total)
        message = assembler.add(decoder.part, payload, decoder.total)
        if message is not None:
            out.append(message)


def test_split_parts_covers_the_message_once() -> None:
    assert split_parts(10, 4) == [(Part.FIRST, 0, 4), (Part.MORE, 4, 8), (Part.LAST, 8, 10)]
    assert split_parts(8, 4) == [(Part.FIRST, 0, 4), (Part.LAST, 4, 8)]
    assert split_parts(4, 4) == [(Part.WHOLE, 0, 4)]
    assert split_parts(0, 4) == [(Part.WHOLE, 0, 0)]


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.integers(1, 700), st.integers(0, 10))
def test_whole_frames_between_parts_arrive_first_and_intact(
    message: bytes, part_size: int, at: int
) -> None:
    frames = _parted(message, part_size)
    at = min(at, len(frames))
    stream = b"".join([*frames[:at], frame(b"ping"), *frames[at:]])
    decoder, assembler = FrameDecoder(), PartAssembler()
    got: list[bytes] = []
    for i in range(0, len(stream), 7):
        decoder.feed(stream[i : i + 7])
        got += _messages(decoder, assembler)
    assert got == ([b"ping", message] if at < len(frames) else [message, b"ping"])
    assert not assembler.in_progress and assembler.held == 0


def test_the_first_header_announces_the_whole_message_and_is_checked_early() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(frame_header(10, Part.FIRST, 101))
    with pytest.raises(WireError) as info:
        decoder.next_frame()
    assert info.value.reason == "oversize" and "message of 101 bytes" in info.value.detail
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(frame_header(10, Part.FIRST, 100)[:6])
    assert decoder.next_frame() is None and decoder.wants() == 2  # the total is missing


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([(Part.MORE, 4, 0)], "without a first part"),
        ([(Part.LAST, 4, 0)], "without a first part"),
        ([(Part.FIRST, 4, 10), (Part.FIRST, 4, 10)], "began inside"),
        ([(Part.FIRST, 4, 10), (Part.MORE, 7, 0)], "11 bytes for a 10-byte"),
        ([(Part.FIRST, 4, 10), (Part.LAST, 2, 0)], "6 bytes for a 10-byte"),
        ([(Part.FIRST, 11, 10)], "first part of 11 bytes"),
    ],
)
def test_parts_that_break_the_rules_are_refused_before_their_body(
    frames: list[tuple[Part, int, int]], message: str
) -> None:
    assembler = PartAssembler()
    with pytest.raises(WireError, match=message) as info:
        for part, length, total in frames:
            assembler.expect(part, length, total)
            assembler.add(part, b"x" * length, total)
    assert info.value.reason == "bad_part"
