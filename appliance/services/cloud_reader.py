# SPDX-License-Identifier: GPL-2.0-or-later
"""Reading a point's disk back from a cloud store: for `cloud restore`, `cloud verify --deep`, and the NBD
server a failover from the bucket boots from (adapters/nbdkit_plugin.py).

Blocks come from their packs by ranged GETs: the blocks a read wants that sit one after the other in a pack
come in one request. Each one is opened with the store's key and checked against its id before a byte of it
is used; a block that fails names its pack. Pack headers are fetched once (the pack's tail).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.domain.blocks import block_count, block_length
from appliance.domain.cloud import ZERO, BlockMap, CloudDisk, CloudPoint, PackEntry, PackRef
from appliance.errors import CloudObjectError
from appliance.ports import ObjectStorage
from appliance.transfer.sealed import Sealer, SealError, header_span, open_header

HEADER_GUESS = 64 << 10  # one tail GET usually holds a pack's whole header (512 entries of 44 bytes)
MAX_SPAN = 8 << 20  # a ranged GET fetches at most this much of a pack at once


class PackHeaders:
    """Pack headers, fetched once each (thread-safe: the NBD server reads from several threads)."""

    def __init__(self, bucket: ObjectStorage, sealer: Sealer, known: dict[str, list[PackEntry]] | None = None) -> None:
        self.bucket, self.sealer = bucket, sealer
        self._entries: dict[str, list[PackEntry]] = dict(known or {})
        self._lock = threading.Lock()

    def entries(self, pack: PackRef) -> list[PackEntry]:
        with self._lock:
            cached = self._entries.get(pack.name)
        if cached is not None:
            return cached
        entries = fetch_header(self.bucket, self.sealer, pack)
        with self._lock:
            self._entries[pack.name] = entries
        return entries


def fetch_header(bucket: ObjectStorage, sealer: Sealer, pack: PackRef) -> list[PackEntry]:
    """A pack's entries from its tail: one GET, two when the header is larger than the first guess."""
    tail = bucket.get_tail(pack.name, pack.version, min(HEADER_GUESS, pack.size))
    try:
        span = header_span(pack.size, tail)
        if span > len(tail):
            tail = bucket.get_tail(pack.name, pack.version, span)
        return open_header(sealer, pack.name, pack.size, tail)
    except SealError as exc:
        raise CloudObjectError(f"object {pack.name} is damaged: its header does not open ({exc})") from exc


@dataclass(slots=True)
class _Fetch:
    pack: int
    first_entry: int
    count: int
    blocks: list[int]  # the disk blocks these entries are, in entry order


class DiskReader:
    """One disk of one point, read from the bucket block by block."""

    def __init__(self, bucket: ObjectStorage, sealer: Sealer, point: CloudPoint, disk: CloudDisk,
                 headers: PackHeaders) -> None:  # fmt: skip
        self.bucket, self.sealer, self.point, self.disk, self.headers = bucket, sealer, point, disk, headers
        self.map: BlockMap = point.block_map(disk)
        self.total = block_count(disk.size, disk.block_size)
        self.fetched_bytes = 0

    def length(self, block: int) -> int:
        return block_length(block, self.disk.size, self.disk.block_size)

    def blocks(self, first: int, count: int) -> Iterator[tuple[int, bytes]]:
        """(block, bytes) of blocks [first, first + count), in order; zero blocks as zeroes."""
        got: dict[int, bytes] = {}
        for fetch in self._plan(first, count):
            got.update(self._fetch(fetch))
        for b in range(first, min(first + count, self.total)):
            yield b, got.pop(b) if b in got else bytes(self.length(b))

    def read(self, offset: int, length: int) -> bytes:
        bs = self.disk.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        data = b"".join(chunk for _, chunk in self.blocks(first, last - first + 1))
        start = offset - first * bs
        return data[start : start + length]

    def _plan(self, first: int, count: int) -> list[_Fetch]:
        """Consecutive entries of one pack become one GET (up to MAX_SPAN of blocks)."""
        fetches: list[_Fetch] = []
        cur: _Fetch | None = None
        for b in range(first, min(first + count, self.total)):
            pack, entry = self.map.get(b)
            if pack == ZERO:
                continue
            if cur is not None and cur.pack == pack and entry == cur.first_entry + cur.count \
                    and cur.count * self.disk.block_size < MAX_SPAN:  # fmt: skip
                cur.blocks.append(b)
                cur.count += 1
                continue
            cur = _Fetch(pack, entry, 1, [b])
            fetches.append(cur)
        return fetches

    def _fetch(self, fetch: _Fetch) -> dict[int, bytes]:
        ref = self.point.packs[fetch.pack]
        entries = self.headers.entries(ref)
        if fetch.first_entry + fetch.count > len(entries):
            raise CloudObjectError(f"object {ref.name} is damaged: it has {len(entries)} blocks, a manifest of "
                                   f"{self.point.host} {self.point.point} needs entry "
                                   f"{fetch.first_entry + fetch.count - 1}")  # fmt: skip
        wanted = entries[fetch.first_entry : fetch.first_entry + fetch.count]
        start, end = wanted[0].offset, wanted[-1].offset + wanted[-1].length
        data = self.bucket.get(ref.name, ref.version, start, end)
        if len(data) != end - start:
            raise CloudObjectError(f"object {ref.name} is damaged: {len(data)} bytes where {end - start} were asked")
        self.fetched_bytes += len(data)
        out = {}
        for block, e in zip(fetch.blocks, wanted, strict=True):
            sealed = data[e.offset - start : e.offset - start + e.length]
            try:
                out[block] = self.sealer.open_block(e.block_id, sealed, self.length(block))
            except SealError as exc:
                raise CloudObjectError(f"object {ref.name} is damaged: block {block} of {self.point.host}'s "
                                       f"{self.disk.slot} fails its check ({exc})") from exc  # fmt: skip
        return out
