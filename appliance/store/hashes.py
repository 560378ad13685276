# SPDX-License-Identifier: GPL-2.0-or-later
"""Block hash lists on the appliance: 32 bytes per block, in block order, one file per disk.

The newest point's list is what the next incremental compares against. It is built by copying the
previous list (resized to the new disk) and overwriting the blocks the host sent, so memory stays flat
whatever the disk size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from appliance.domain.blocks import HASH_LEN, Carry, DiskDigest, block_count, block_length, zero_hash

_CHUNK_BLOCKS = 65536


def iter_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BLOCKS * HASH_LEN):
            yield chunk


def digest_of(path: Path) -> str:
    d = DiskDigest()
    for chunk in iter_chunks(path):
        d.add(chunk)
    return d.hexdigest()


class HashListWriter:
    """The new point's hash list, started from the previous one and updated block by block."""

    def __init__(self, path: Path, previous: Path | None, carry: Carry, size: int, block_size: int, *,
                 resume: bool = False) -> None:  # fmt: skip
        """`resume`: go on with the list a cut run left (a kept partial point) as it is."""
        self.path = path
        self.size = size
        self.block_size = block_size
        if resume:
            self._fd = os.open(path, os.O_RDWR)
            if os.fstat(self._fd).st_size != carry.total * HASH_LEN:
                os.close(self._fd)
                raise ValueError(f"{path.name} is not the hash list of a disk of {carry.total} blocks")
            return
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        copied = 0
        if previous is not None and carry.known:
            with open(previous, "rb") as src:
                want = carry.known * HASH_LEN
                while copied < want:
                    n = os.copy_file_range(src.fileno(), self._fd, want - copied, copied, copied)
                    if n == 0:
                        break
                    copied += n
        # Everything past the carried blocks reads as zeroes until the host says otherwise.
        self._fill_zero(copied // HASH_LEN, carry.total)
        os.ftruncate(self._fd, carry.total * HASH_LEN)

    def _fill_zero(self, first: int, end: int) -> None:
        full = zero_hash(self.block_size)
        i = first
        while i < end:
            n = min(_CHUNK_BLOCKS, end - i)
            os.pwrite(self._fd, full * n, i * HASH_LEN)
            i += n
        last = block_count(self.size, self.block_size) - 1
        if first <= last < end and self.size % self.block_size:
            os.pwrite(self._fd, zero_hash(block_length(last, self.size, self.block_size)), last * HASH_LEN)

    def set(self, first: int, hashes: bytes) -> None:
        os.pwrite(self._fd, hashes, first * HASH_LEN)

    def set_zero(self, first: int, count: int) -> None:
        self._fill_zero(first, first + count)

    def digest(self) -> str:
        """The digest of the list as it is now, without closing it: a disk's first pass is proven by it
        before later passes change the list again."""
        d = DiskDigest()
        offset = 0
        while chunk := os.pread(self._fd, _CHUNK_BLOCKS * HASH_LEN, offset):
            d.add(chunk)
            offset += len(chunk)
        return d.hexdigest()

    def sync(self) -> None:
        """On the appliance's disk (a kept partial point's record may then say so)."""
        os.fsync(self._fd)

    def finish(self) -> str:
        """fsync and return the digest of the list, to compare with the one the host computed."""
        os.fsync(self._fd)
        os.close(self._fd)
        return digest_of(self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
