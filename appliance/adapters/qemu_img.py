# SPDX-License-Identifier: GPL-2.0-or-later
"""qemu-img: creating points, checking them, reading their chains and allocation maps.

Overlays always get a backing path relative to their own folder and an explicit backing format, so a
store can be moved or copied and every point opens with stock QEMU tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.adapters.process import CommandFailed, run
from appliance.errors import ChainCorruptError, ImageToolError, StoreFullError

QEMU_IMG = "qemu-img"


def qcow2_size(size: int) -> int:
    """qcow2 holds whole 512-byte sectors; the exact size of the source is kept in the point's record."""
    return -(-size // 512) * 512


def create_argv(path: Path, size: int, backing: str | None = None, cluster_size: int = 65536,
                backing_format: str = "qcow2") -> list[str]:  # fmt: skip
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_format]
    return [*argv, str(path), str(qcow2_size(size))]


@dataclass(frozen=True, slots=True)
class Extent:
    start: int
    length: int
    zero: bool
    data: bool
    depth: int = 0  # 0: allocated in the image itself; n: in its n-th backing file
    present: bool = True  # False: allocated nowhere in the chain (reads as zeroes)


def _fail(exc: CommandFailed, what: str) -> ImageToolError | StoreFullError:
    if "No space left" in exc.stderr:
        return StoreFullError(f"{what}: the appliance's disk is full")
    return ImageToolError(f"{what}: {exc.last_line}")


def create(path: Path, size: int, backing: str | None = None, cluster_size: int = 65536,
           backing_format: str = "qcow2") -> None:  # fmt: skip
    """Create a qcow2 image; `backing` is the previous point's file name, relative to `path`'s folder (or
    an NBD URI, nbd+unix:///?socket=..., of format raw)."""
    try:
        run(create_argv(path, size, backing, cluster_size, backing_format), cwd=path.parent)
    except CommandFailed as exc:
        raise _fail(exc, f"cannot create {path.name}") from exc


def info_chain(path: Path) -> list[dict[str, Any]]:
    """`qemu-img info --backing-chain`: the image first, then each backing file down to the base."""
    try:
        out = run([QEMU_IMG, "info", "-U", "--backing-chain", "--output=json", str(path)])
    except CommandFailed as exc:
        raise ChainCorruptError(f"{path.name} does not open as qcow2: {exc.last_line}") from exc
    result = json.loads(out)
    return result if isinstance(result, list) else [result]


def check(path: Path) -> dict[str, Any]:
    """`qemu-img check` of one file (not its backing files); raises on corruption.

    Leaked clusters (exit 3) are not corruption: space an interrupted write allocated and never used.
    """
    try:
        return dict(json.loads(run([QEMU_IMG, "check", "-U", "--output=json", str(path)], ok=(0, 3))))
    except CommandFailed as exc:
        raise ChainCorruptError(f"qemu-img check failed on {path.name}: {exc.last_line}") from exc


def map_extents(path: Path) -> list[Extent]:
    """How every byte of the image (through its backing chain) reads: zero or data."""
    try:
        out = run([QEMU_IMG, "map", "-U", "--output=json", str(path)])
    except CommandFailed as exc:
        raise ChainCorruptError(f"cannot map {path.name}: {exc.last_line}") from exc
    return [
        Extent(
            int(e["start"]),
            int(e["length"]),
            bool(e["zero"]),
            bool(e["data"]),
            int(e.get("depth", 0)),
            bool(e.get("present", True)),
        )  # fmt: skip
        for e in json.loads(out)
    ]


def commit(top: Path) -> None:
    """Write `top`'s clusters into its backing file, leaving `top` as it is (`-d`).

    While this runs, `top` and everything above it read exactly as before: the backing file only gains
    clusters that `top` shadows anyway.
    """
    try:
        run([QEMU_IMG, "commit", "-q", "-d", "-f", "qcow2", str(top)])
    except CommandFailed as exc:
        raise _fail(exc, f"cannot merge {top.name} into its backing file") from exc


def flatten(image: Path, target: Path) -> None:
    """A standalone qcow2 at `target` of what `image` reads as through its backing chain: one point that can
    travel alone (a seed on a disk). Blocks that read as zeroes stay unallocated (convert's own detection).

    `-U`: a point is never written again once published, and a recovery VM may hold its chain open.
    """
    try:
        run([QEMU_IMG, "convert", "-U", "-q", "-f", "qcow2", "-O", "qcow2", str(image), str(target)])
    except CommandFailed as exc:
        if "No space left" in exc.stderr:
            raise StoreFullError(f"cannot write {target}: its disk is full",
                                 hint="free space there, or use a larger disk") from exc  # fmt: skip
        raise ImageToolError(f"cannot flatten {image.name} into {target}: {exc.last_line}") from exc


def resize(path: Path, size: int) -> None:
    """Set the virtual size (a merged point keeps the size of the point it replaces)."""
    try:
        run([QEMU_IMG, "resize", "-q", "--shrink", "-f", "qcow2", str(path), str(qcow2_size(size))])
    except CommandFailed as exc:
        raise _fail(exc, f"cannot resize {path.name}") from exc


def virtual_size(path: Path) -> int:
    return int(info_chain(path)[0]["virtual-size"])
