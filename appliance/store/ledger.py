# SPDX-License-Identifier: GPL-2.0-or-later
"""Block ledgers of a failback: what each block of a disk holds, one 16-byte hash prefix per block, in
a file (flat memory whatever the disk's size).

Two per disk. The VM's ledger is filled by the full read of the bulk copy, then updated from every
pass and from the last blocks, which are read anyway to be sent. The target's ledger holds what the
target reported from reading its own disk: the whole disk once, then every block it wrote, read back
after an fsync with the cache dropped. Comparing the two proves every block of the target without
reading either whole disk again during the cutover: the downtime grows with what the guest wrote last,
not with the size of the disk. 128 bits per block, as the capture's hash exchange (see agent/reader.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from appliance.domain.blocks import HASH_LEN, block_count, block_hashes, block_length, zero_hash

ENTRY = 16  # bytes per block: a sha256 prefix, as the writer reports them (agent/writer.py PREFIX_LEN)
_CHUNK_BLOCKS = 65536


def prefixes(hashes: bytes) -> bytes:
    """The ledger entries of full 32-byte block hashes."""
    return b"".join(hashes[i : i + ENTRY] for i in range(0, len(hashes), HASH_LEN))


def entries(path: Path, width: int = ENTRY) -> Iterator[bytes]:
    """A ledger's (or, width 32, a point's hash list's) entries, as ledger entries, a chunk at a time."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BLOCKS * width):
            yield chunk if width == ENTRY else prefixes(chunk)


class Ledger:
    """The entries of one disk of `size` bytes; a block covered only in part by recorded data is unknown
    until data covering all of it is recorded."""

    def __init__(self, path: Path, size: int, block_size: int) -> None:
        self.path, self.size, self.block_size = path, size, block_size
        self.blocks = block_count(size, block_size)
        self.unknown: set[int] = set()
        self.complete = False  # every block set once (a new file reads as zeroes, which prove nothing)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # a killed run's ledger says nothing
        try:
            os.ftruncate(fd, self.blocks * ENTRY)
        finally:
            os.close(fd)

    def fill(self, chunks: Iterable[bytes]) -> None:
        """Every entry, in block order from block 0 (a whole disk's hashes as the target reports them)."""
        with open(self.path, "r+b") as f:
            for chunk in chunks:
                f.write(chunk)
            self.complete = f.tell() == self.blocks * ENTRY
        self.unknown.clear()

    def get_entries(self, first_block: int, count: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(first_block * ENTRY)
            return f.read(count * ENTRY)

    def set_entries(self, first_block: int, new: bytes) -> None:
        """Entries for consecutive blocks from `first_block`."""
        count = len(new) // ENTRY
        if first_block < 0 or first_block + count > self.blocks:
            raise ValueError(f"blocks {first_block}+{count} are outside a disk of {self.blocks} blocks")
        with open(self.path, "r+b") as f:
            f.seek(first_block * ENTRY)
            f.write(new)
        self.unknown.difference_update(range(first_block, first_block + count))

    def record_data(self, offset: int, data: bytes | memoryview) -> None:
        """Bytes now at `offset`."""
        first, last = self._whole_blocks(offset, len(data))
        if last > first:
            start = first * self.block_size - offset
            whole = bytes(data[start : start + (last - first) * self.block_size])
            self.set_entries(first, prefixes(block_hashes(whole, self.block_size)))

    def record_zeroes(self, offset: int, length: int) -> None:
        """The range now reads as zeroes."""
        first, last = self._whole_blocks(offset, length)
        for start in range(first, last, _CHUNK_BLOCKS):
            stop = min(last, start + _CHUNK_BLOCKS)
            zeros = (zero_hash(block_length(i, self.size, self.block_size))[:ENTRY] for i in range(start, stop))
            self.set_entries(start, b"".join(zeros))

    def _whole_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """Blocks [first, last) that the range covers whole; blocks it covers in part become unknown."""
        bs, end = self.block_size, offset + length
        first = -(-offset // bs)
        last = self.blocks if end >= self.size else end // bs  # the last, short block ends at `size`
        if offset % bs:
            self.unknown.add(offset // bs)
        if end < self.size and end % bs:
            self.unknown.add(end // bs)
        return first, max(first, last)


def differing_blocks(mine: Iterator[bytes], theirs: Iterator[bytes], limit: int = 10) -> tuple[int, list[int]]:
    """How many blocks differ between two streams of ledger entries, and the first `limit` of them.
    Equal chunks compare at memcmp speed; only a differing chunk is walked block by block."""
    count, block = 0, 0
    first: list[int] = []
    for a, b in zip(mine, theirs, strict=True):
        if a != b:
            for j in range(len(a) // ENTRY):
                if a[j * ENTRY : (j + 1) * ENTRY] != b[j * ENTRY : (j + 1) * ENTRY]:
                    count += 1
                    if len(first) < limit:
                        first.append(block + j)
        block += len(a) // ENTRY
    return count, first
