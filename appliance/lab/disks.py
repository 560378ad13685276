# SPDX-License-Identifier: GPL-2.0-or-later
"""Disks of lab hosts: sparse image files with data in extents, changed the way servers change them."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

from appliance.adapters.process import CommandFailed, run
from appliance.errors import LabError

ALIGN = 4096
_PATTERN_BYTES = 8 << 20


class _Noise:
    """Incompressible, non-repeating-enough data, fast: a random pool read at random offsets."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = self.rng.randbytes(_PATTERN_BYTES + (1 << 20))

    def take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            piece = min(n - len(out), 1 << 20)
            start = self.rng.randrange(0, _PATTERN_BYTES)
            out += self.pool[start : start + piece]
            out[-8:] = self.rng.randbytes(8)  # no two pieces alike
        return bytes(out)


def noise(n: int, seed: int) -> bytes:
    """`n` bytes of incompressible data."""
    return _Noise(seed).take(n)


def make(path: Path, size: int, data_fraction: float, seed: int = 0) -> None:
    """A sparse disk of `size` bytes with about `data_fraction` of it in random extents of data."""
    with open(path, "wb") as f:
        f.truncate(size)
    write_extents(path, size, data_fraction, seed=seed, extent=(64 << 10, 8 << 20))


def write_extents(
    path: Path | str,
    size: int,
    fraction: float,
    *,
    seed: int,
    extent: tuple[int, int] = (4096, 1 << 20),
    zero_fraction: float = 0.0,
) -> int:
    """Overwrite about `fraction` of the disk in random 4 KiB-aligned extents (and zero `zero_fraction`).

    Returns the bytes written. Extents are sized between `extent[0]` and `extent[1]`, like a file system's
    writes: from a few blocks of metadata to a run of a large file.
    """
    rng = random.Random(seed * 7919 + 1)
    noise = _Noise(seed)
    target = int(size * fraction)
    written = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        while written < target:
            length = min(_aligned(rng.randint(*extent)), target - written)
            length = max(ALIGN, _aligned(length))
            offset = _aligned(rng.randrange(0, max(1, size - length)))
            length = min(length, size - offset)
            os.pwrite(fd, noise.take(length), offset)
            written += length
        zeroed = 0
        while zeroed < int(size * zero_fraction):
            length = _aligned(rng.randint(*extent))
            offset = _aligned(rng.randrange(0, max(1, size - length)))
            length = min(length, size - offset)
            os.pwrite(fd, bytes(length), offset)
            zeroed += length
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _aligned(n: int) -> int:
    return n - n % ALIGN


def copy_sparse(source: Path, dest: Path) -> None:
    run(["cp", "--sparse=always", source, dest])


def attach_loop(image: Path) -> str:
    return run(["losetup", "--find", "--show", image]).strip()


@contextlib.contextmanager
def partition_loop(image: Path | str, offset: int, size: int) -> Iterator[str]:
    """A loop device of `size` bytes of `image` from `offset` (one partition), detached afterwards.

    A loop device rather than e2fsprogs' `?offset=`: e2fsck loses the offset when it reopens after a replay.
    """
    argv = ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), str(image)]
    try:
        device = run(argv, timeout=60).strip()
    except CommandFailed as exc:
        raise LabError(f"cannot attach {image} to a loop device: {exc.last_line}") from exc
    try:
        yield device
    finally:
        with contextlib.suppress(CommandFailed):
            run(["losetup", "--detach", device], timeout=60)


def detach_loop(device: str) -> None:
    with contextlib.suppress(CommandFailed):  # already gone
        run(["losetup", "-d", device])


def disk_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
