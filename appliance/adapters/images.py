# SPDX-License-Identifier: GPL-2.0-or-later
"""The ImageTool port over qemu-img and qemu-storage-daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.adapters import qemu_img, qsd


class QemuImages:
    def create(self, path: Path, size: int, backing: str | None = None, cluster_size: int = 65536,
               backing_format: str = "qcow2") -> None:  # fmt: skip
        qemu_img.create(path, size, backing, cluster_size, backing_format)

    def info_chain(self, path: Path) -> list[dict[str, Any]]:
        return qemu_img.info_chain(path)

    def check(self, path: Path) -> dict[str, Any]:
        return qemu_img.check(path)

    def commit(self, top: Path) -> None:
        qemu_img.commit(top)

    def resize(self, path: Path, size: int) -> None:
        qemu_img.resize(path, size)

    def flatten(self, image: Path, target: Path) -> None:
        qemu_img.flatten(image, target)

    def virtual_size(self, path: Path) -> int:
        return qemu_img.virtual_size(path)

    def map_zero_extents(self, path: Path) -> list[tuple[int, int]]:
        return [(e.start, e.length) for e in qemu_img.map_extents(path) if e.zero]

    def export(self, image: Path, run_dir: Path, *, writable: bool, backing: bool = True) -> qsd.ImageExport:
        return qsd.ImageExport(image, run_dir, writable=writable, backing=backing)

    def own_extents(self, path: Path) -> list[tuple[int, int, bool]]:
        return [(e.start, e.length, e.zero) for e in qemu_img.map_extents(path) if e.depth == 0 and e.present]

    def copy_dirty(self, image: Path, bitmaps: list[str], target: Path, run_dir: Path) -> None:
        qemu_img.create(target, qemu_img.virtual_size(image))
        with qsd.ImageExport(image, run_dir, writable=False, export=False) as daemon:
            daemon.copy_dirty(bitmaps, target)

    def unmount_stale(self, path: Path) -> None:
        qsd.unmount_stale(path)
