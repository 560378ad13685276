# SPDX-License-Identifier: GPL-2.0-or-later
"""The reader and the appliance's decoder over plain pipes (no SSH): what crosses, and the digest."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from appliance.agent import reader as wire
from appliance.agent import reader_source
from appliance.domain.blocks import block_hashes, carry_over
from appliance.transfer import protocol

BS = 65536


def _run_reader(
    disk: Path, previous: bytes | None, old_size: int | None, block_size: int = BS
) -> list[protocol.Record]:
    code = reader_source()
    proc = subprocess.Popen(
        [sys.executable, "-c", wire.BOOTSTRAP, str(len(code))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(code + protocol.encode_request([(str(disk), block_size)]))
    proc.stdin.flush()
    records = protocol.RecordReader(lambda: proc.stdout.read1(1 << 20))  # type: ignore[union-attr]
    records.block_size = block_size
    hello = records.next()
    assert isinstance(hello, protocol.Hello)
    size = hello.disks[0].size
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
        [sys.executable, "-c", wire.BOOTSTRAP, str(len(code))],
        input=code + protocol.encode_request([(str(tmp_path / "nope"), BS)]),
        capture_output=True,
    )
    pieces = iter([proc.stdout, b""])
    rec = protocol.RecordReader(lambda: next(pieces)).next()
    assert isinstance(rec, protocol.RemoteFailure) and rec.code == "disk-missing"
