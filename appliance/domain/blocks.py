# SPDX-License-Identifier: GPL-2.0-or-later
"""Fixed-size blocks of a disk, their hashes, and the digest that identifies a disk's content.

A disk of `size` bytes is cut into blocks of `block_size`; the last one may be shorter. Each block is
identified by sha256 of its bytes. A disk's digest is sha256 over the concatenation of its block hashes
in order: it changes with any byte, it is computed on the host during the read at no extra cost (the
block hashes exist anyway), and `verify` recomputes it from a stored point the same way.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from functools import lru_cache

HASH_LEN = 32


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def block_length(index: int, size: int, block_size: int) -> int:
    return min(block_size, size - index * block_size)


@lru_cache(maxsize=64)
def zero_hash(length: int) -> bytes:
    return hashlib.sha256(bytes(length)).digest()


def is_zero_hash(digest: bytes, length: int) -> bool:
    return digest == zero_hash(length)


class OldBlock(enum.IntEnum):
    """What the appliance knows of a block as the new point's overlay will read it before any write."""

    ZERO = 0  # reads as zeroes: nothing to write unless the host's block has data
    HASH = 1  # reads as the previous point's block, whose hash is known
    UNKNOWN = 2  # must be written whatever it holds (e.g. a last partial block after a resize)


@dataclass(frozen=True, slots=True)
class Carry:
    """How the previous point's hash list maps onto a disk whose size may have changed."""

    known: int  # blocks [0, known) keep the previous point's hash (same index, same length)
    unknown: tuple[int, ...]  # blocks that must be written whatever they hold
    total: int  # blocks of the new disk; blocks not known nor unknown read as zeroes


def carry_over(old_size: int | None, new_size: int, block_size: int) -> Carry:
    """Map the previous point (None: there is none, the overlay reads zeroes) onto the new size.

    A grown disk reads zeroes past the old end (qcow2 returns zeroes past its backing file's end); a block
    whose length changed (the old or new last partial block) is unknown and always rewritten.
    """
    total = block_count(new_size, block_size)
    if old_size is None:
        return Carry(known=0, unknown=(), total=total)
    old_total = block_count(old_size, block_size)
    common = min(old_total, total)
    unknown = [
        i
        for i in range(max(0, common - 1), common)
        if block_length(i, old_size, block_size) != block_length(i, new_size, block_size)
    ]
    known = common - len(unknown)
    return Carry(known=known, unknown=tuple(unknown), total=total)


class DiskDigest:
    """Accumulates block hashes, in order, into a disk digest."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.blocks = 0

    def add(self, block_hashes: bytes) -> None:
        self._h.update(block_hashes)
        self.blocks += len(block_hashes) // HASH_LEN

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def block_hashes(buf: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """The concatenated sha256 of each block of `buf` (the last may be short); zero blocks cost a compare."""
    if isinstance(buf, memoryview):
        buf = buf.tobytes()  # one copy (memcpy speed): bytes.startswith is memcmp, a view's == is far slower
    out = []
    view = memoryview(buf)
    full_zero = bytes(block_size)
    for start in range(0, len(buf), block_size):
        length = min(block_size, len(buf) - start)
        if length == block_size and buf.startswith(full_zero, start):
            out.append(zero_hash(block_size))
        else:
            out.append(hashlib.sha256(view[start : start + length]).digest())
    return b"".join(out)


# -- what a sink lacks: the one comparison every copy makes ------------------------------------------------

PREFIX_LEN = 16  # bytes of a block hash two sides compare: 128 bits, collision-safe, half the exchange


@dataclass(frozen=True, slots=True)
class Change:
    """Consecutive blocks the sink does not hold yet: each reads as zeroes (`zero`), or each has data."""

    first: int  # block index on the disk
    count: int
    zero: bool


def zero_prefix(index: int, size: int, block_size: int) -> bytes:
    """What a block that reads as zeroes holds, as two sides compare it (its length counts: the last block
    may be short)."""
    return zero_hash(block_length(index, size, block_size))[:PREFIX_LEN]


def changed_runs(first: int, hashes: bytes, held: list[bytes | None], size: int, block_size: int) -> list[Change]:
    """The blocks from `first` whose hash (`hashes`, 32 bytes a block) differs from what the sink holds
    (`held`: a hash, or its first PREFIX_LEN bytes, per block; None where the sink's block is unknown and
    must be written whatever it holds), as runs of zero blocks and runs of data blocks, in block order."""
    runs: list[Change] = []
    for j in range(len(hashes) // HASH_LEN):
        mine = hashes[j * HASH_LEN : (j + 1) * HASH_LEN]
        theirs = held[j]
        if theirs is not None and mine[: len(theirs)] == theirs:
            continue
        index = first + j
        zero = mine == zero_hash(block_length(index, size, block_size))
        last = runs[-1] if runs else None
        if last is not None and last.zero == zero and last.first + last.count == index:
            runs[-1] = Change(last.first, last.count + 1, zero)
        else:
            runs.append(Change(index, 1, zero))
    return runs
