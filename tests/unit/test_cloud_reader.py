# SPDX-License-Identifier: GPL-2.0-or-later
"""Reading a cloud point back (services/cloud_reader.py) and the failover's cache (services/cloud_cache.py),
over an in-memory bucket: blocks come back as written, neighbours in one request, zero blocks from nowhere,
and a damaged pack is named."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.domain.cloud import BlockMap, CloudDisk, CloudPoint, PackRef
from appliance.errors import CloudObjectError
from appliance.ports import ObjectLock
from appliance.services.cloud_cache import CachedDisk
from appliance.services.cloud_reader import DiskReader, PackHeaders
from appliance.transfer.sealed import PackWriter, Sealer, new_key

BS = 32 << 10


class _Bucket:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()

    def put(self, key: str, data: bytes, lock: ObjectLock | None = None) -> str | None:
        self.objects[key] = data
        return None

    def get(self, key: str, version: str | None = None, start: int = 0, end: int | None = None) -> bytes:
        self.requests["get"] += 1
        return self.objects[key][start:end]

    def get_tail(self, key: str, version: str | None, length: int) -> bytes:
        self.requests["tail"] += 1
        return self.objects[key][-length:]


def _point(blocks: int, zero_every: int = 4) -> tuple[_Bucket, Sealer, CloudPoint, bytes]:
    """A one-disk point: every zero_every-th block zeroes (stored nowhere), the rest random, in one pack."""
    sealer = Sealer(new_key(), "s")
    bucket = _Bucket()
    disk = bytearray()
    m = BlockMap(blocks)
    w = PackWriter(sealer)
    for b in range(blocks):
        data = bytes(BS) if b % zero_every == 0 else os.urandom(BS)
        disk += data
        if b % zero_every:
            m.put(b, 0, w.add(sealer.block_id(hashlib.sha256(data).digest()), data))
    body = w.finish("data/p0")
    bucket.put("data/p0", body)
    now = datetime.now(UTC)
    point = CloudPoint("web1", "p1", now, now, {}, "", (PackRef("data/p0", None, len(body)),),
                       (CloudDisk("disk0", len(disk), BS, "", m.runs()),))  # fmt: skip
    return bucket, sealer, point, bytes(disk)


def _reader(bucket: _Bucket, sealer: Sealer, point: CloudPoint) -> DiskReader:
    return DiskReader(bucket, sealer, point, point.disks[0], PackHeaders(bucket, sealer))  # type: ignore[arg-type]


def test_blocks_read_back_as_written_with_neighbours_in_one_request() -> None:
    bucket, sealer, point, disk = _point(40)
    reader = _reader(bucket, sealer, point)
    assert reader.read(0, len(disk)) == disk
    # The pack's entries follow one another across the zero blocks between them: one ranged GET, one tail.
    assert bucket.requests["tail"] == 1 and bucket.requests["get"] == 1
    assert reader.read(BS + 100, 5000) == disk[BS + 100 : BS + 5100]


def test_a_damaged_pack_is_named() -> None:
    bucket, sealer, point, _ = _point(8)
    body = bytearray(bucket.objects["data/p0"])
    body[50] ^= 1
    bucket.objects["data/p0"] = bytes(body)
    with pytest.raises(CloudObjectError, match="data/p0 is damaged"):
        _reader(bucket, sealer, point).read(BS, BS)


def test_the_cache_serves_reads_and_the_stream_fills_the_rest(tmp_path: Path) -> None:
    bucket, sealer, point, disk = _point(200)
    cache = CachedDisk(_reader(bucket, sealer, point), tmp_path / "disk0.cache")
    assert cache.read(10 * BS, 3 * BS) == disk[10 * BS : 13 * BS]
    assert cache.fetched_on_read == 2  # block 12 reads as zeroes: nothing to fetch
    cache._last_miss = 0.0  # the guest has been quiet: the stream goes
    cache.stream()
    assert cache.streamed.is_set() and all(cache.held)
    gets = bucket.requests["get"]
    assert cache.read(0, len(disk)) == disk
    assert bucket.requests["get"] == gets  # all local now
    cache.close()
    again = CachedDisk(_reader(bucket, sealer, point), tmp_path / "disk0.cache")
    assert all(again.held) and again.read(0, len(disk)) == disk  # a restarted server keeps what was fetched
    again.close()
