# SPDX-License-Identifier: GPL-2.0-or-later
"""The cloud copy's layout, as data (pure; no I/O, no cryptography: see transfer/sealed.py for that).

A bucket holds, for one cloud store (one `cloud add`):

    config              what the store is (its id, format), and a sealed check that a key is its key
    canary/<random>     the locked object `cloud add` failed to delete (proof that the bucket enforces locks)
    data/<random>       packs: sealed blocks, one after the other, then the pack's sealed header (which
                        block ids it holds, where) and that header's length (4 bytes)
    points/<random>     one sealed manifest per recovery point: the host, the point, its VM settings, and per
                        disk its size, digest and block map

Blocks are the store's 32 KiB blocks, identified by a keyed hash of their content (the store's id key over
their sha256): the same content is stored once, whatever host or point it comes from, and the bucket says
nothing about content to anyone without the key. Names are random; sizes are all that shows.

A block map says, for every block of a disk, which pack and which entry of that pack holds it, or that the
block reads as zeroes. It is kept as runs (a stretch of blocks stored one after the other in one pack), so a
manifest grows with how scattered the changes were, not with the disk's size: the first point of a disk
written in order is one run per pack.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance.domain.blocks import block_count

PACK_TARGET = 16 << 20  # a pack is sent once it holds this much: few requests, and a cut re-sends at most this
LOCK_GENERATION = timedelta(days=10)  # a lock is set this much past what is required, so it is extended rarely
ZERO = -1  # the pack number of a block that reads as zeroes

_RUN = struct.Struct("<QIII")  # first block, count, pack number (in the manifest's pack table), first entry
RUN_SIZE = _RUN.size


class LayoutError(ValueError):
    """A manifest or pack header that decrypted but does not describe a disk (a bug, or a forged key)."""


class BlockMap:
    """Where each block of one disk is stored: pack number (ZERO: nowhere, it reads as zeroes) and entry."""

    def __init__(self, total: int) -> None:
        self.packs = array("i", [ZERO]) * total
        self.entries = array("I", [0]) * total

    @property
    def total(self) -> int:
        return len(self.packs)

    def put(self, block: int, pack: int, entry: int) -> None:
        self.packs[block] = pack
        self.entries[block] = entry

    def get(self, block: int) -> tuple[int, int]:
        return self.packs[block], self.entries[block]

    def used_packs(self) -> set[int]:
        return {p for p in set(self.packs) if p != ZERO}

    def runs(self) -> bytes:
        """The map as runs: blocks [first, first + count) are entries [entry, entry + count) of one pack."""
        out = bytearray()
        packs, entries, total = self.packs, self.entries, self.total
        i = 0
        while i < total:
            pack = packs[i]
            if pack == ZERO:
                i += 1
                continue
            first, entry = i, entries[i]
            i += 1
            while i < total and packs[i] == pack and entries[i] == entry + (i - first):
                i += 1
            out += _RUN.pack(first, i - first, pack, entry)
        return bytes(out)

    @classmethod
    def from_runs(cls, data: bytes, total: int, packs: int) -> BlockMap:
        """Read runs back, refusing any that leaves the disk or names a pack the manifest does not list."""
        if len(data) % RUN_SIZE:
            raise LayoutError(f"a block map of {len(data)} bytes is not whole runs")
        m = cls(total)
        for first, count, pack, entry in _RUN.iter_unpack(data):
            if count == 0 or first + count > total or pack >= packs:
                raise LayoutError(f"a run of blocks {first}+{count} in pack {pack} is outside the disk or its packs")
            m.packs[first : first + count] = array("i", [pack]) * count
            m.entries[first : first + count] = array("I", range(entry, entry + count))
        return m

    def stretches(self) -> Iterator[tuple[int, int, int, int]]:
        """(first block, count, pack, first entry) of each stored stretch, in block order."""
        yield from _RUN.iter_unpack(self.runs())


@dataclass(frozen=True, slots=True)
class PackEntry:
    """One sealed block in a pack: its id, and where its bytes are in the pack's object."""

    block_id: bytes
    offset: int
    length: int


_ENTRY = struct.Struct("<32sQI")


def encode_entries(entries: Sequence[PackEntry]) -> bytes:
    return b"".join(_ENTRY.pack(e.block_id, e.offset, e.length) for e in entries)


def decode_entries(data: bytes, pack_size: int) -> list[PackEntry]:
    """A pack header's entries; refused when one points outside the pack's blocks."""
    if len(data) % _ENTRY.size:
        raise LayoutError(f"a pack header of {len(data)} bytes is not whole entries")
    out = [PackEntry(*fields) for fields in _ENTRY.iter_unpack(data)]
    for e in out:
        if e.length == 0 or e.offset + e.length > pack_size:
            raise LayoutError(f"a pack entry at {e.offset}+{e.length} is outside the pack's {pack_size} bytes")
    return out


TRAILER = struct.Struct("<I")  # the sealed header's length, the last 4 bytes of a pack


@dataclass(frozen=True, slots=True)
class CloudDisk:
    slot: str
    size: int
    block_size: int
    digest: str  # the disk's digest as the appliance records it (domain/blocks.py): `verify --deep` recomputes it
    runs: bytes  # BlockMap.runs(), pack numbers into CloudPoint.packs


@dataclass(frozen=True, slots=True)
class PackRef:
    name: str  # data/<random>
    version: str | None  # the object version written (None on a bucket without versioning): reads ask for it
    size: int


@dataclass(frozen=True, slots=True)
class CloudPoint:
    """One recovery point as its manifest records it: everything a failover on a new appliance needs."""

    host: str
    point: str
    created: datetime
    pushed: datetime
    settings: dict[str, object]  # the host's VM settings (transfer/replica.SETTINGS)
    consistency: str
    packs: tuple[PackRef, ...]
    disks: tuple[CloudDisk, ...]

    def block_map(self, disk: CloudDisk) -> BlockMap:
        return BlockMap.from_runs(disk.runs, block_count(disk.size, disk.block_size), len(self.packs))


def lock_until(now: datetime, days: int) -> datetime:
    """The retention date an object is given: the days asked, plus a generation so that a block that newer
    points keep using has its lock extended once every LOCK_GENERATION, not at every push."""
    return now + timedelta(days=days) + LOCK_GENERATION


def needs_extension(until: datetime | None, now: datetime, days: int) -> bool:
    """An object a newly pushed point needs must stay locked at least `days` from now."""
    return until is None or until < now + timedelta(days=days)
