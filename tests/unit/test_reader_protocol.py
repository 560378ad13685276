# SPDX-License-Identifier: GPL-2.0-or-later
"""The reader and the appliance's decoder over plain pipes (no SSH): what crosses, and the digest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance.agent import reader_source, wire
from appliance.domain.blocks import block_hashes, carry_over
from appliance.transfer import protocol

BS = 65536


def _run_reader(
    disk: Path, previous: bytes | None, old_size: int | None, block_size: int = BS
) -> list[protocol.Record]:
    code = reader_source()
    proc = subprocess.Popen(
        [sys.executable, "-c", wire.READER_BOOTSTRAP, str(len(code))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(code + protocol.encode_request([(str(disk), block_size)]))
    proc.stdin.flush()
    records = protocol.RecordReader(lambda: proc.stdout.read1(1 << 20))  # type: ignore[union-attr]
    hello = records.next()
    assert isinstance(hello, protocol.Hello)
    size = hello.disks[0].size
    records.start_disk(size, block_size)
    carry = carry_over(old_size, size, block_size)

    def send() -> None:
        chunks = [previous] if previous else []
        for piece in protocol.encode_old_hashes(chunks, carry, old_size or 0, block_size):
            proc.stdin.write(piece)  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    threading.Thread(target=send, daemon=True).start()
    out: list[protocol.Record] = [hello]
    while not isinstance(out[-1], protocol.Finished | protocol.RemoteFailure):
        out.append(records.next())
    assert proc.wait(10) == 0, proc.stderr.read()  # type: ignore[union-attr]
    return out


def test_full_read_sends_data_blocks_only_and_digest_matches(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    data = bytearray(40 * BS + 1000)
    data[3 * BS : 5 * BS] = os.urandom(2 * BS)
    data[-500:] = b"x" * 500
    disk.write_bytes(data)
    recs = _run_reader(disk, None, None)
    runs = [r for r in recs if isinstance(r, protocol.DataRun)]
    assert [(r.first, len(r.data)) for r in runs] == [(3, 2 * BS), (40, 1000)]
    end = next(r for r in recs if isinstance(r, protocol.DiskEnd))
    assert end.digest == hashlib.sha256(block_hashes(bytes(data), BS)).hexdigest()


def test_incremental_sends_changed_and_zeroed_blocks(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    data = bytearray(os.urandom(16 * BS))
    disk.write_bytes(data)
    previous = block_hashes(bytes(data), BS)
    data[2 * BS + 7] ^= 1
    data[9 * BS : 11 * BS] = bytes(2 * BS)
    disk.write_bytes(data)
    recs = _run_reader(disk, previous, len(data))
    assert [(r.first, len(r.data)) for r in recs if isinstance(r, protocol.DataRun)] == [(2, BS)]
    assert [(r.first, r.count) for r in recs if isinstance(r, protocol.ZeroRun)] == [(9, 2)]


def test_missing_disk_is_reported_not_crashed(tmp_path: Path) -> None:
    code = reader_source()
    proc = subprocess.run(
        [sys.executable, "-c", wire.READER_BOOTSTRAP, str(len(code))],
        input=code + protocol.encode_request([(str(tmp_path / "nope"), BS)]),
        capture_output=True,
    )
    pieces = iter([proc.stdout, b""])
    rec = protocol.RecordReader(lambda: next(pieces)).next()
    assert isinstance(rec, protocol.RemoteFailure) and rec.code == "disk-missing"


# -- a hostile host: every length and position the reader could never send -------------------------------

SIZE = 10 * BS + 100  # ten whole blocks and a short last one (block 10)


def _data(first: int, length: int) -> bytes:
    count = -(-length // BS)
    return wire.DATA.pack(b"D", first, length) + bytes(32) * count + b"\xaa" * length


def _decoding(stream: bytes) -> protocol.RecordReader:
    """A decoder of one disk fed `stream`, failing the test if it asks for a byte more (it must refuse a record
    at its header, never wait for the payload the header claims)."""
    pieces = iter([stream])

    def recv_some() -> bytes:
        piece = next(pieces, None)
        if piece is None:
            raise AssertionError("the decoder read past the record it should have refused")
        return piece

    records = protocol.RecordReader(recv_some)
    records.start_disk(SIZE, BS)
    return records


def _refused(stream: bytes, needle: str) -> None:
    records = _decoding(stream)
    with pytest.raises(protocol.ProtocolError, match=needle):
        while True:
            records.next()


def _json_record(tag: bytes, obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return tag + wire.U32.pack(len(body)) + body


@pytest.mark.parametrize(
    ("stream", "needle"),
    [
        (wire.DATA.pack(b"D", 0, 0xFFFFFFFF), "data record of 4294967295 bytes"),  # claims 4 GiB
        (wire.DATA.pack(b"D", 0, wire.MAX_RUN + 1), "data record of 1048577 bytes"),
        (wire.DATA.pack(b"D", 0, 0), "data record of 0 bytes"),
        (b"H" + wire.U32.pack(0xFFFFFFFF), "hello record of 4294967295 bytes"),
        (b"X" + wire.U32.pack(protocol.MAX_JSON_RECORD + 1), "failure record of"),
        (wire.DATA.pack(b"D", 11, BS), "past the disk's end"),
        (wire.DATA.pack(b"D", 2**64 - 1, BS), "past the disk's end"),
        (wire.DATA.pack(b"D", 9, 2 * BS), "past the disk's end"),  # overlaps the short last block as whole
        (wire.DATA.pack(b"D", 3, BS + 5), "short block before the disk's end"),
        (wire.ZERO.pack(b"Z", 0, 0xFFFFFFFF), "past the disk's end"),  # a negative-looking count
        (wire.ZERO.pack(b"Z", 10, 2), "past the disk's end"),
        (wire.ZERO.pack(b"Z", 4, 0), "empty zero record"),
        (_data(5, BS) + _data(5, BS), "at block 5, after block 5"),  # a repeat
        (_data(5, 2 * BS) + wire.ZERO.pack(b"Z", 6, 1), "at block 6, after block 6"),  # a step back into a run
        (wire.PROGRESS.pack(b"P", SIZE + 1), "progress of"),
        (wire.PROGRESS.pack(b"P", 8 * BS) + wire.PROGRESS.pack(b"P", 8 * BS), "progress of"),
        (wire.END.pack(b"E", SIZE - 1), "end of a disk"),
        (b"Welcome to web1!\n", "unknown type 'W'"),
        (_json_record(b"H", [1, 2]), "not a JSON object"),
        (b"H" + wire.U32.pack(20000) + b"[" * 20000, "not JSON"),
        (_json_record(b"H", {"protocol": 2, "disks": [{"path": "/d", "size": "big", "kind": "file"}]}), "size"),
        (_json_record(b"H", {"protocol": 7, "disks": []}), "protocol 7"),
        (_json_record(b"F", {"post_hook": {"rc": "0"}}), "exit status"),
    ],
)
def test_hostile_records_are_refused_at_their_header(stream: bytes, needle: str) -> None:
    _refused(stream, needle)


def test_data_after_the_end_of_the_disk_is_refused() -> None:
    records = _decoding(wire.END.pack(b"E", SIZE) + bytes(32) + _data(0, BS))
    assert isinstance(records.next(), protocol.DiskEnd)
    with pytest.raises(protocol.ProtocolError, match="outside a disk"):
        records.next()


def test_what_the_reader_does_send_passes() -> None:
    stream = (
        _data(0, 2 * BS) + wire.ZERO.pack(b"Z", 2, 3) + wire.PROGRESS.pack(b"P", 8 * BS) + _data(9, BS + 100)
        + wire.END.pack(b"E", SIZE) + bytes(32)
    )  # fmt: skip
    records = _decoding(stream)
    kinds = [type(records.next()).__name__ for _ in range(5)]
    assert kinds == ["DataRun", "ZeroRun", "Progress", "DataRun", "DiskEnd"]


def test_text_from_the_host_is_shown_on_one_line() -> None:
    failure = _json_record(b"X", {"code": "pre-hook-failed", "message": "line one\nline two\x1b[2J" + "x" * 900})
    record = _decoding(failure).next()
    assert isinstance(record, protocol.RemoteFailure)
    assert record.message.startswith("line one line two [2J") and len(record.message) == protocol.MAX_MESSAGE


# -- later passes: blocks written while they were read, read again ---------------------------------------

_END = wire.END.pack(b"E", SIZE) + bytes(32)
_MOMENT = _json_record(b"M", {"kind": "frozen", "seconds": 0.2, "passes": 2, "reread": [BS]})


def _repass(disk: int) -> bytes:
    return wire.REPASS.pack(b"R", disk)


def test_later_passes_may_send_a_block_again_each_in_order() -> None:
    stream = _data(5, BS) + _END + _repass(0) + _data(5, BS) + _data(7, BS) + _repass(0) + _data(5, BS) + _MOMENT
    records = _decoding(stream)
    kinds = [type(records.next()).__name__ for _ in range(8)]
    assert kinds == ["DataRun", "DiskEnd", "Repass", "DataRun", "DataRun", "Repass", "DataRun", "Moment"]


def test_a_point_read_from_lvm_snapshots_says_how_full_they_got() -> None:
    said = ["vg0/data: thick snapshot, 12.5% of its space used", "x\n" * 300]
    moment = _json_record(b"M", {"kind": "lvm-snapshot", "seconds": 1.9, "reread": [0], "snapshots": said})
    records = _decoding(_END + moment)
    records.next()
    record = records.next()
    assert isinstance(record, protocol.Moment) and record.kind == "lvm-snapshot"
    assert record.snapshots[0] == said[0] and len(record.snapshots[1]) == 200 and "\n" not in record.snapshots[1]


@pytest.mark.parametrize(
    ("stream", "needle"),
    [
        (_data(5, BS) + _repass(0), "in the middle of a disk's first pass"),
        (_END + _repass(1), "later pass over disk 1 \\(there are 1\\)"),
        (_END + _repass(0) + _data(5, BS) + _data(5, BS), "at block 5, after block 5"),
        (_END + _repass(0) + wire.PROGRESS.pack(b"P", BS), "progress record in a later pass"),
        (_END + _repass(0) + _END, "end-of-disk record in a later pass"),
        (_END + _MOMENT + _repass(0), "after the moment record"),
        (_END + _json_record(b"M", {"kind": "perfect", "reread": [0]}), "kind 'perfect'"),
        (_END + _json_record(b"M", {"kind": "frozen", "reread": []}), "each disk read again"),
        (_END + _json_record(b"M", {"kind": "frozen", "reread": [0], "seconds": -1}), "freeze time"),
        (_data(5, BS) + _MOMENT, "moment record in the middle of a disk's first pass"),
    ],
)
def test_later_passes_out_of_their_order_are_refused(stream: bytes, needle: str) -> None:
    _refused(stream, needle)
