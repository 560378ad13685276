# SPDX-License-Identifier: GPL-2.0-or-later
"""FakeImages: the ImageTool port over plain files, for unit tests of the use cases.

An image is one file: a header (a magic, then JSON: virtual size, cluster size, backing file name, and
which clusters the image itself holds, as data or as zeroes), then the image's own data at its virtual
offset, sparse. Being one self-describing file, an image survives what the store does to it: renames
(publication, merges), fsyncs, unlinks.

Reads go through the backing chain as qcow2 does: a cluster the image holds is read from it (a zero
cluster reads zeroes and shadows the backing file), any other cluster from the backing file, whose
name is relative to the image's folder (zeroes past the backing file's end). A write into part of a
cluster the image does not hold copies the rest of the cluster up first, as QEMU does.
tests/integration/test_image_tool_contract.py runs the same assertions against QEMU.

`fail(operation, error, after=n)` makes the operation raise `error` once, after `n` calls that succeed
(borg's failing chunker). Operations are the port's method names and the exported image's `read`,
`write`, `zero` and `flush`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.errors import ApplianceError, ChainCorruptError, ImageToolError

MAGIC = b"FAKEQCOW"
HEADER_SIZE = 1 << 16
_LENGTH = struct.Struct("<I")

OPERATIONS = frozenset(
    {"create", "info_chain", "check", "map_zero_extents", "commit", "resize", "virtual_size", "export",
     "own_extents", "flatten", "read", "write", "zero", "flush"}
)  # fmt: skip


def padded(size: int) -> int:
    """qcow2 holds whole 512-byte sectors (as qemu_img.qcow2_size)."""
    return -(-size // 512) * 512


@dataclass(slots=True)
class _Meta:
    size: int
    cluster_size: int
    backing: str | None
    clusters: dict[int, bool]  # cluster index -> True: a zero cluster; False: data the image holds

    def encode(self) -> bytes:
        doc = {
            "size": self.size,
            "cluster_size": self.cluster_size,
            "backing": self.backing,
            "data": _runs(i for i, zero in sorted(self.clusters.items()) if not zero),
            "zero": _runs(i for i, zero in sorted(self.clusters.items()) if zero),
        }
        body = json.dumps(doc).encode()
        if len(MAGIC) + _LENGTH.size + len(body) > HEADER_SIZE:
            raise ImageToolError("the fake image's cluster map outgrew its header; use a smaller disk")
        return MAGIC + _LENGTH.pack(len(body)) + body

    @classmethod
    def decode(cls, raw: bytes, name: str) -> _Meta:
        if not raw.startswith(MAGIC):
            raise ImageToolError(f"{name} is not a (fake) qcow2 image")
        try:
            (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
            doc = json.loads(raw[len(MAGIC) + _LENGTH.size : len(MAGIC) + _LENGTH.size + length])
            clusters = {i: False for first, n in doc["data"] for i in range(first, first + n)}
            clusters.update({i: True for first, n in doc["zero"] for i in range(first, first + n)})
            return cls(int(doc["size"]), int(doc["cluster_size"]), doc["backing"], clusters)
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise ImageToolError(f"{name} has a damaged header: {exc}") from exc


def _runs(indices: Iterator[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


def _merged(segments: Iterator[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """(start, end, zero) segments in order -> (start, length, zero) extents, neighbours of a kind joined."""
    out: list[tuple[int, int, bool]] = []
    for start, end, zero in segments:
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] == zero:
            out[-1] = (out[-1][0], out[-1][1] + end - start, zero)
        elif end > start:
            out.append((start, end - start, zero))
    return out


class _Image:
    """One image file, open, with its backing chain (unless `backing` is False)."""

    def __init__(self, path: Path, *, writable: bool, backing: bool = True, depth: int = 0) -> None:
        if depth > 256:
            raise ImageToolError(f"{path.name}: the backing chain loops")
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise ImageToolError(f"cannot open {path.name}: {exc.strerror}") from exc
        try:
            self.meta = _Meta.decode(os.pread(self.fd, HEADER_SIZE, 0), path.name)
            self.below = None
            if backing and self.meta.backing is not None:
                self.below = _Image(path.parent / self.meta.backing, writable=False, depth=depth + 1)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.below is not None:
            self.below.close()
        os.close(self.fd)

    @property
    def size(self) -> int:
        return self.meta.size

    def _clusters(self, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(cluster index, start, stop) of each cluster piece of [offset, end)."""
        cs = self.meta.cluster_size
        pos = offset
        while pos < end:
            index = pos // cs
            stop = min(end, (index + 1) * cs)
            yield index, pos, stop
            pos = stop

    # -- reading ---------------------------------------------------------------------------------------

    def segments(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(start, stop, reads_as_zero) through the chain, as `qemu-img map` sees it."""
        for index, start, stop in self._clusters(offset, end):
            state = self.meta.clusters.get(index)
            if state is not None:
                yield start, stop, state
            elif self.below is not None and start < self.below.size:
                middle = min(stop, self.below.size)
                yield from self.below.segments(start, middle)
                yield middle, stop, True
            else:
                yield start, stop, True

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for index, start, stop in self._clusters(offset, offset + length):
            state = self.meta.clusters.get(index)
            if state is False:
                data = os.pread(self.fd, stop - start, HEADER_SIZE + start)
                out += data + bytes(stop - start - len(data))
            elif state is None and self.below is not None and start < self.below.size:
                middle = min(stop, self.below.size)
                out += self.below.read(start, middle - start) + bytes(stop - middle)
            else:
                out += bytes(stop - start)
        return bytes(out)

    def own_extents(self) -> list[tuple[int, int, bool]]:
        cs = self.meta.cluster_size
        pieces = ((i * cs, min((i + 1) * cs, self.size), zero) for i, zero in sorted(self.meta.clusters.items()))
        return _merged(pieces)

    # -- writing ---------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        cs = self.meta.cluster_size
        for index, start, stop in self._clusters(offset, offset + len(view)):
            piece = view[start - offset : stop - offset]
            cluster_start, cluster_end = index * cs, min((index + 1) * cs, self.size)
            if self.meta.clusters.get(index) is not False and (start, stop) != (cluster_start, cluster_end):
                whole = bytearray(self.read(cluster_start, cluster_end - cluster_start))  # copy up, as QEMU
                whole[start - cluster_start : stop - cluster_start] = piece
                piece, start = memoryview(bytes(whole)), cluster_start
            os.pwrite(self.fd, piece, HEADER_SIZE + start)
            self.meta.clusters[index] = False

    def zero(self, offset: int, length: int) -> None:
        """Whole clusters become zero clusters (shadowing the backing file); parts of one get zeroes written."""
        cs = self.meta.cluster_size
        for index, start, stop in self._clusters(offset, offset + length):
            if (start, stop) == (index * cs, min((index + 1) * cs, self.size)):
                self.meta.clusters[index] = True
            else:
                self.write(start, bytes(stop - start))

    def resize(self, size: int) -> None:
        cs = self.meta.cluster_size
        self.meta.size = padded(size)
        self.meta.clusters = {i: z for i, z in self.meta.clusters.items() if i * cs < self.meta.size}
        os.ftruncate(self.fd, HEADER_SIZE + self.meta.size)

    def save(self) -> None:
        os.pwrite(self.fd, self.meta.encode(), 0)


class FakeExport:
    """The ExportedImage port on one fake image: what qemu-storage-daemon's FUSE export gives."""

    def __init__(self, tool: FakeImages, image: Path, *, writable: bool, backing: bool) -> None:
        self.tool = tool
        self.image = image
        self.writable = writable
        self.backing = backing
        self._open: _Image | None = None

    def __enter__(self) -> FakeExport:
        self.tool.step("export")
        self._open = _Image(self.image, writable=self.writable, backing=self.backing)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        image, self._open = self._image, None
        try:
            if self.writable:
                image.save()
        finally:
            image.close()

    @property
    def _image(self) -> _Image:
        if self._open is None:
            raise ImageToolError(f"{self.image.name} is not exported")
        return self._open

    def _within(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self._image.size:
            raise ImageToolError(f"{self.image.name}: bytes {offset}..{offset + length} are past its end")

    def _writable(self) -> _Image:
        if not self.writable:
            raise ImageToolError(f"{self.image.name} is exported read-only")
        return self._image

    def read(self, offset: int, length: int) -> bytes:
        self.tool.step("read")
        self._within(offset, length)
        return self._image.read(offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.tool.step("write")
        self._within(offset, len(data))
        self._writable().write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.tool.step("zero")
        self._within(offset, length)
        self._writable().zero(offset, length)

    def flush(self) -> None:
        self.tool.step("flush")
        image = self._writable()
        image.save()
        os.fsync(image.fd)


@dataclass(slots=True)
class _Armed:
    calls_left: int
    error: ApplianceError


class FakeImages:
    """The ImageTool port. See the module doc."""

    def __init__(self) -> None:
        self._armed: dict[str, _Armed] = {}

    # -- failures --------------------------------------------------------------------------------------

    def fail(self, operation: str, error: ApplianceError, *, after: int = 0) -> None:
        """Make `operation` raise `error` once, after `after` calls of it succeed."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {sorted(OPERATIONS)}")
        self._armed[operation] = _Armed(after, error)

    def step(self, operation: str) -> None:
        """Called by every operation first: raises the armed error when its turn comes."""
        armed = self._armed.get(operation)
        if armed is None:
            return
        if armed.calls_left > 0:
            armed.calls_left -= 1
            return
        del self._armed[operation]
        raise armed.error

    @property
    def armed(self) -> set[str]:
        """Operations whose failure has not fired yet (a test asserts it did)."""
        return set(self._armed)

    # -- the port --------------------------------------------------------------------------------------

    def create(self, path: Path, size: int, backing: str | None = None, cluster_size: int = 65536,
               backing_format: str = "qcow2") -> None:  # fmt: skip
        self.step("create")
        if backing is not None:
            with _opened(path.parent / backing, ImageToolError, writable=False):
                pass  # qemu-img create opens the backing chain, and fails without it
        meta = _Meta(padded(size), cluster_size, backing, {})
        try:
            with open(path, "wb") as f:
                f.write(meta.encode())
                f.truncate(HEADER_SIZE + meta.size)
        except OSError as exc:
            raise ImageToolError(f"cannot create {path.name}: {exc.strerror}") from exc

    def info_chain(self, path: Path) -> list[dict[str, Any]]:
        self.step("info_chain")
        infos: list[dict[str, Any]] = []
        with _opened(path, ChainCorruptError, writable=False) as image:
            current: _Image | None = image
            name = str(path)
            while current is not None:
                info: dict[str, Any] = {"filename": name, "format": "qcow2", "virtual-size": current.size,
                                        "cluster-size": current.meta.cluster_size}  # fmt: skip
                if current.meta.backing is not None:
                    name = str(Path(name).parent / current.meta.backing)
                    info.update({"backing-filename": current.meta.backing, "full-backing-filename": name,
                                 "backing-filename-format": "qcow2"})  # fmt: skip
                infos.append(info)
                current = current.below
        return infos

    def check(self, path: Path) -> dict[str, Any]:
        self.step("check")
        with _opened(path, ChainCorruptError, writable=False, backing=False) as image:
            cs = image.meta.cluster_size
            outside = [i for i in image.meta.clusters if i * cs >= image.size]
            if outside:
                raise ChainCorruptError(f"qemu-img check failed on {path.name}: clusters past the end {outside}")
            return {"check-errors": 0, "filename": path.name, "format": "qcow2",
                    "total-clusters": -(-image.size // cs), "allocated-clusters": len(image.meta.clusters)}  # fmt: skip

    def map_zero_extents(self, path: Path) -> list[tuple[int, int]]:
        self.step("map_zero_extents")
        with _opened(path, ChainCorruptError, writable=False) as image:
            return [(start, length) for start, length, zero in _merged(image.segments(0, image.size)) if zero]

    def own_extents(self, path: Path) -> list[tuple[int, int, bool]]:
        self.step("own_extents")
        with _opened(path, ChainCorruptError, writable=False, backing=False) as image:
            return image.own_extents()

    def commit(self, top: Path) -> None:
        """Write `top`'s own clusters into its backing file (grown to `top`'s size if smaller); `top` stays."""
        self.step("commit")
        with _opened(top, ImageToolError, writable=False, backing=False) as image:
            if image.meta.backing is None:
                raise ImageToolError(f"cannot merge {top.name} into its backing file: it has none")
            with _opened(top.parent / image.meta.backing, ImageToolError, writable=True) as base:
                if base.size < image.size:
                    base.resize(image.size)
                for start, length, zero in image.own_extents():
                    if zero:
                        base.zero(start, length)
                    else:
                        base.write(start, image.read(start, length))
                base.save()
                os.fsync(base.fd)

    def resize(self, path: Path, size: int) -> None:
        self.step("resize")
        with _opened(path, ImageToolError, writable=True, backing=False) as image:
            image.resize(size)
            image.save()

    def flatten(self, image: Path, target: Path) -> None:
        """A standalone image of what `image` reads as through its chain; zeroes stay unallocated."""
        self.step("flatten")
        with _opened(image, ImageToolError, writable=False) as source:
            cs = source.meta.cluster_size
            self.create(target, source.size, cluster_size=cs)
            with _opened(target, ImageToolError, writable=True) as copy:
                for start, stop, zero in source.segments(0, source.size):
                    data = b"" if zero else source.read(start, stop - start)
                    if data.strip(b"\0"):
                        copy.write(start, data)
                copy.save()
                os.fsync(copy.fd)

    def virtual_size(self, path: Path) -> int:
        self.step("virtual_size")
        with _opened(path, ChainCorruptError, writable=False, backing=False) as image:
            return image.size

    def export(self, image: Path, run_dir: Path, *, writable: bool, backing: bool = True) -> FakeExport:
        run_dir.mkdir(parents=True, exist_ok=True)
        return FakeExport(self, image, writable=writable, backing=backing)

    def copy_dirty(self, image: Path, bitmaps: list[str], target: Path, run_dir: Path) -> None:
        raise NotImplementedError("dirty bitmaps (failback) are not modelled by FakeImages")

    def unmount_stale(self, path: Path) -> None:
        """Nothing is ever mounted."""


@contextmanager
def _opened(path: Path, error: type[ApplianceError], *, writable: bool, backing: bool = True) -> Iterator[_Image]:
    """An image open for one operation; a failure to open it is raised as `error` (as each qemu-img
    subcommand reports it: info, check and map as a damaged chain, the others as a tool failure)."""
    try:
        image = _Image(path, writable=writable, backing=backing)
    except ImageToolError as exc:
        raise error(exc.message) from exc
    try:
        yield image
    finally:
        image.close()
