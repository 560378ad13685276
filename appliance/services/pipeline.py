# SPDX-License-Identifier: GPL-2.0-or-later
"""The block pipeline: every copy the appliance makes, as a source of blocks and a sink that lacks some.

A copy reads its source chunk by chunk with each block's hash, asks its sink what each block holds
(`HeldHashes`), and puts only the blocks that differ (`domain.blocks.changed_runs`): runs of data, and
runs that now read as zeroes. Sources: a host's disk through the reader (which compares on the host:
its records arrive already as runs, see services/backup.py), a local qcow2 image read through QEMU
(`services.image_reader.read_chunks`: a point, a recovery VM's disk, a QEMU backup job's copy). Sinks: a
new overlay of a chain (`OverlaySink`: the point being written, with its hash list), a target disk
through the failback writer (services/failback.py). Capture, import and failback share it; a replica
at another site is one more source and sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from appliance.domain.blocks import HASH_LEN, PREFIX_LEN, Carry, changed_runs, zero_prefix
from appliance.ports import ExportedImage
from appliance.services.image_reader import Chunk
from appliance.store.hashes import HashListWriter


class HeldHashes(Protocol):
    """What a sink holds: per block from `first`, its hash (or its first PREFIX_LEN bytes), None if unknown."""

    def held(self, first: int, count: int) -> list[bytes | None]: ...


class BlockSink(Protocol):
    """Where the blocks a sink lacks go. `hashes`: 32 bytes per block of `data`."""

    def put_data(self, offset: int, data: bytes | memoryview, first: int, hashes: bytes) -> None: ...

    def put_zeroes(self, offset: int, length: int, first: int, count: int) -> None: ...


@dataclass(slots=True)
class Copied:
    """What a copy put: bytes of data and bytes zeroed (the changed bytes are both)."""

    data: int = 0
    zeroed: int = 0

    @property
    def changed(self) -> int:
        return self.data + self.zeroed


def copy_changes(
    chunks: Iterable[Chunk],
    held: HeldHashes,
    sink: BlockSink,
    size: int,
    block_size: int,
    seen: Callable[[Chunk], None] = lambda _: None,
) -> Copied:
    """Put every block of `chunks` that the sink does not hold. `seen` learns every chunk read (a ledger of
    the source's blocks, say), changed or not."""
    copied = Copied()
    for chunk in chunks:
        seen(chunk)
        first = chunk.offset // block_size
        count = len(chunk.hashes) // HASH_LEN
        for run in changed_runs(first, chunk.hashes, held.held(first, count), size, block_size):
            offset = run.first * block_size
            length = min(run.count * block_size, size - offset)
            if run.zero or chunk.data is None:
                sink.put_zeroes(offset, length, run.first, run.count)
                copied.zeroed += length
            else:
                start = offset - chunk.offset
                hashes = chunk.hashes[(run.first - first) * HASH_LEN : (run.first - first + run.count) * HASH_LEN]
                sink.put_data(offset, chunk.data[start : start + length], run.first, hashes)
                copied.data += length
    return copied


class PreviousHashes:
    """What a new overlay holds before any write: the previous point's block hashes (its hash list, mapped
    onto the new size by `carry`), zeroes where it has none, unknown where a block's length changed."""

    def __init__(self, hash_list: Path | None, carry: Carry, size: int, block_size: int) -> None:
        self.carry, self.size, self.block_size = carry, size, block_size
        self.file: BinaryIO | None = open(hash_list, "rb") if hash_list else None  # noqa: SIM115 (close())

    def held(self, first: int, count: int) -> list[bytes | None]:
        known = b""
        if self.file is not None and first < self.carry.known:
            self.file.seek(first * HASH_LEN)
            known = self.file.read(min(count, self.carry.known - first) * HASH_LEN)
        out: list[bytes | None] = []
        for j in range(count):
            index = first + j
            if index in self.carry.unknown:
                out.append(None)
            elif index < self.carry.known and self.file is not None:
                out.append(known[j * HASH_LEN : j * HASH_LEN + PREFIX_LEN])
            else:
                out.append(zero_prefix(index, self.size, self.block_size))
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class OverlaySink:
    """A new overlay of a chain (exported for writing) and its block hash list: the blocks put, and their
    hashes, are the new point's."""

    def __init__(self, exported: ExportedImage, hashes: HashListWriter) -> None:
        self.exported, self.hashes = exported, hashes

    def put_data(self, offset: int, data: bytes | memoryview, first: int, hashes: bytes) -> None:
        self.exported.write(offset, data)
        self.hashes.set(first, hashes)

    def put_zeroes(self, offset: int, length: int, first: int, count: int) -> None:
        self.exported.zero(offset, length)
        self.hashes.set_zero(first, count)


@dataclass
class Pace:
    """At no more than `rate` bytes a second on average (0: no limit): `wait` sleeps while what was counted
    is ahead of the rate. A replication's receive (replicate.Throttle) and a push's puts share it."""

    rate: int
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    started: float | None = None
    sent: int = 0

    def wait(self) -> None:
        if self.rate <= 0:
            return
        if self.started is None:
            self.started = self.clock()
        ahead = self.sent / self.rate - (self.clock() - self.started)
        if ahead > 0:
            self.sleep(ahead)

    def __call__(self, size: int) -> None:
        """Wait for the rate, then count `size` bytes about to go."""
        self.wait()
        self.sent += size
