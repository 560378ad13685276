# SPDX-License-Identifier: GPL-2.0-or-later
"""Reading a qcow2 image (through its chain, as a VM would) block by block, with block hashes.

The image is exported by qemu-storage-daemon and read as a plain file. Ranges that `qemu-img map`
reports as zero are not read: their hashes are known.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.domain.blocks import block_count, block_hashes, zero_hash
from appliance.ports import Tools

READ_CHUNK = 4 << 20


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    length: int
    data: bytes | None  # None: the whole chunk reads as zeroes
    hashes: bytes  # 32 bytes per block


def read_chunks(tools: Tools, image: Path, run_dir: Path, size: int, block_size: int) -> Iterator[Chunk]:
    """Every READ_CHUNK of the image's first `size` bytes, in order."""
    zero = _merged(tools.images.map_zero_extents(image))
    with tools.images.export(image, run_dir, writable=False) as exported:
        for offset in range(0, size, READ_CHUNK):
            length = min(READ_CHUNK, size - offset)
            if _covered(zero, offset, length):
                yield Chunk(offset, length, None, zero_hashes(offset, length, size, block_size))
            else:
                data = exported.read(offset, length)
                yield Chunk(offset, length, data, block_hashes(data, block_size))


def _merged(extents: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Zero extents joined where they touch, as sorted (starts, ends) for bisection."""
    starts: list[int] = []
    ends: list[int] = []
    for start, length in sorted(extents):
        if ends and start <= ends[-1]:
            ends[-1] = max(ends[-1], start + length)
        else:
            starts.append(start)
            ends.append(start + length)
    return starts, ends


def _covered(zero: tuple[list[int], list[int]], offset: int, length: int) -> bool:
    starts, ends = zero
    i = bisect.bisect_right(starts, offset) - 1
    return i >= 0 and ends[i] >= offset + length


def zero_hashes(offset: int, length: int, size: int, block_size: int) -> bytes:
    first = offset // block_size
    n = block_count(length, block_size)
    last_len = size - (first + n - 1) * block_size
    if last_len >= block_size:
        return zero_hash(block_size) * n
    return zero_hash(block_size) * (n - 1) + zero_hash(last_len)
