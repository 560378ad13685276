# SPDX-License-Identifier: GPL-2.0-or-later
"""zstd on the replication wire: the source's K records (transfer/replica.py) and the DR site's decoder of
them (transfer/protocol.py), which trusts nothing of a K record but what the D record it stands for proves."""

from __future__ import annotations

import os
import sys
import tracemalloc

import pytest

from appliance.agent import wire
from appliance.bench.replication import text_like
from appliance.domain.blocks import block_hashes
from appliance.transfer import protocol, replica

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

BS = 32768
SIZE = 64 * BS


def _packed(first: int, data: bytes) -> bytes:
    header, payload = replica.DataPacker().record(first, len(data), block_hashes(data, BS), data)
    return header + payload


def _k(first: int, length: int, frame: bytes) -> bytes:
    """A K record of `frame` as it is (its hashes do not matter here: the decoder refuses it first)."""
    return protocol.COMPRESSED.pack(b"K", first, length, len(frame)) + bytes(32) * -(-length // BS) + frame


def _decoding(stream: bytes, *, compressed: bool = True, size: int = SIZE) -> protocol.RecordReader:
    """A decoder of one disk fed `stream`: a read past it is the stream's end."""
    pieces = iter([stream])
    records = protocol.RecordReader(lambda: next(pieces, b""))
    if compressed:
        records.accept_compressed()
    records.start_disk(size, BS)
    return records


def _refused(stream: bytes, needle: str, **kwargs: bool) -> None:
    with pytest.raises(protocol.ProtocolError, match=needle):
        _decoding(stream, **kwargs).next()


def test_compressible_data_travels_as_a_k_record_and_arrives_as_the_same_data_run() -> None:
    data = text_like(wire.MAX_RUN)
    packer = replica.DataPacker()
    header, payload = packer.record(3, len(data), block_hashes(data, BS), data)
    assert header[:1] == b"K" and len(payload) < len(data) // 2
    assert (packer.raw, packer.sent) == (len(data), len(payload))
    record = _decoding(header + payload, size=64 * BS).next()
    assert isinstance(record, protocol.DataRun) and record.first == 3 and bytes(record.data) == data
    # What the receiver re-hashes, block by block, against the hashes sent: unchanged by compression.
    assert block_hashes(record.data, BS) == record.hashes


def test_incompressible_data_travels_as_a_plain_d_record() -> None:
    data = os.urandom(wire.MAX_RUN)
    packer = replica.DataPacker()
    header, payload = packer.record(0, len(data), block_hashes(data, BS), data)
    assert header[:1] == b"D" and payload is data and packer.sent == packer.raw == len(data)
    record = _decoding(header + payload).next()
    assert isinstance(record, protocol.DataRun) and bytes(record.data) == data


def test_a_sample_spares_random_data_the_whole_compression() -> None:
    packer = replica.DataPacker()
    assert not packer._worth_trying(os.urandom(wire.MAX_RUN))
    assert packer._worth_trying(text_like(wire.MAX_RUN))
    assert not packer._worth_trying(os.urandom(BS))  # a record of one block: a sample of 4 KiB
    assert packer._worth_trying(os.urandom(8192))  # a record under 16 KiB is compressed whole: its own sample


def test_a_short_last_block_and_a_zero_run_between_k_records_decode() -> None:
    size = 10 * BS + 100
    tail = text_like(BS + 100, seed=2)
    stream = _packed(0, text_like(2 * BS)) + wire.ZERO.pack(b"Z", 2, 3) + _packed(9, tail) + wire.END.pack(b"E", size)
    records = _decoding(stream + bytes(32), size=size)
    kinds = [records.next() for _ in range(4)]
    assert [type(r).__name__ for r in kinds] == ["DataRun", "ZeroRun", "DataRun", "DiskEnd"]
    assert bytes(kinds[2].data) == tail  # type: ignore[union-attr]


def test_k_records_are_refused_where_compression_was_not_asked_for() -> None:
    _refused(_packed(0, text_like(BS)), "unknown type 'K'", compressed=False)


def test_a_zstd_bomb_is_refused_without_allocating_what_it_claims() -> None:
    # 1 GiB of zeroes, in a frame whose window fits a record's: only the header's length may ever come out.
    squeeze = zstd.ZstdCompressor(options={zstd.CompressionParameter.compression_level: 19,
                                           zstd.CompressionParameter.window_log: protocol.ZSTD_WINDOW_LOG})  # fmt: skip
    bomb = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(1024)) + squeeze.flush()
    assert len(bomb) < 64 << 10
    tracemalloc.start()
    try:
        _refused(_k(0, wire.MAX_RUN, bomb), "does not end at its 1048576 bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    # The same in zstd's default window (128 MiB to decode): refused before the window is allocated.
    default = zstd.compress(bytes(64 << 20), level=19)
    _refused(_k(0, wire.MAX_RUN, default), "too much memory")


def test_a_frame_cut_short_is_refused() -> None:
    frame = zstd.compress(text_like(4 * BS))
    _refused(_k(0, 4 * BS, frame[: len(frame) // 2]), "does not end at its|does not decompress")


def test_a_stream_that_ends_inside_a_k_record_ends_the_stream() -> None:
    with pytest.raises(EOFError):
        _decoding(_packed(0, text_like(4 * BS))[:-10]).next()


@pytest.mark.parametrize(
    ("stream", "needle"),
    [
        (_k(0, 4 * BS, zstd.compress(text_like(2 * BS))), "does not end at its 131072 bytes"),  # shorter than it says
        (_k(0, 2 * BS, zstd.compress(text_like(4 * BS))), "does not end at its 65536 bytes"),  # longer than it says
        (_k(0, 2 * BS, zstd.compress(text_like(2 * BS)) + b"junk"), "bytes after its frame"),
        (_k(0, 2 * BS, zstd.compress(text_like(2 * BS)) + zstd.compress(text_like(BS))), "bytes after its frame"),
        (_k(0, BS, b"\x00" * 100), "does not decompress"),  # not zstd at all
    ],
    ids=["short", "long", "trailing", "two-frames", "not-zstd"],
)
def test_a_frame_of_another_length_than_its_header_is_refused(stream: bytes, needle: str) -> None:
    _refused(stream, needle)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (protocol.COMPRESSED.pack(b"K", 0, wire.MAX_RUN + 1, 100), "of 100 bytes for 1048577"),
        (protocol.COMPRESSED.pack(b"K", 0, 0xFFFFFFFF, 0xFFFFFFFE), "for 4294967295"),
        (protocol.COMPRESSED.pack(b"K", 0, BS, BS), f"of {BS} bytes for {BS}"),  # does not save anything
        (protocol.COMPRESSED.pack(b"K", 0, BS, 0), "of 0 bytes"),
        (protocol.COMPRESSED.pack(b"K", 63, 2 * BS, 100), "past the disk's end"),
        (protocol.COMPRESSED.pack(b"K", 3, BS + 5, 100), "short block before the disk's end"),
    ],
)
def test_hostile_k_headers_are_refused_before_their_payload_is_read(header: bytes, needle: str) -> None:
    pieces = iter([header])

    def recv_some() -> bytes:
        piece = next(pieces, None)
        if piece is None:
            raise AssertionError("the decoder read past the header it should have refused")
        return piece

    records = protocol.RecordReader(recv_some)
    records.accept_compressed()
    records.start_disk(SIZE, BS)
    with pytest.raises(protocol.ProtocolError, match=needle):
        records.next()
