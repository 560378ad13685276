# SPDX-License-Identifier: GPL-2.0-or-later
"""What the capture tests compare: a disk's bytes now, and a stored point's bytes through stock qemu-img."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from tests.conftest import points_json


def file_digest(path: str | Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        left = size if size is not None else os.lseek(fd, 0, os.SEEK_END)
        offset = 0
        while left > 0:
            chunk = os.pread(fd, min(left, 8 << 20), offset)
            if not chunk:
                break
            h.update(chunk)
            offset += len(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def point_raw_digest(image: Path, size: int, scratch: Path) -> str:
    """sha256 of the point's first `size` bytes as `qemu-img convert -O raw` gives them (no appliance code)."""
    raw = scratch / f"{image.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    try:
        total = raw.stat().st_size
        assert total == -(-size // 512) * 512, f"virtual size {total} for a {size}-byte disk"
        with open(raw, "rb") as f:
            f.seek(size)
            assert f.read() == bytes(total - size), "padding past the disk's end must read as zeroes"
        return file_digest(raw, size)
    finally:
        raw.unlink()


def chain_files(home: Path, host: str) -> list[Path]:
    return [home / "store" / host / p["disks"][0]["file"] for p in points_json(home, host)]  # type: ignore[index]


def store_state(home: Path, host: str) -> dict[str, str]:
    """Every file of a host's store (catalog included) with its content hash: 'unchanged' means equal."""
    root = home / "store" / host
    return {
        str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"
    }


def host_add(host, key: Path | str, *extra: str, disk: str | None = None, name: str | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """The CLI arguments that register a lab host, as a user would type them."""
    return [
        "host", "add", name or host.name, "--address", f"root@{host.address}",
        "--disk", disk or host.disk, "--key", str(key), *extra,
    ]  # fmt: skip


def wait_for_transfer(home: Path, host: str, min_bytes: int = 32 << 20, timeout: float = 60.0) -> None:
    """Block until a running backup has written `min_bytes` into its new point: data is flowing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = list((home / "store" / host).glob("*/.*.qcow2.part"))
        if sum(p.stat().st_blocks * 512 for p in parts if p.exists()) >= min_bytes:
            return
        time.sleep(0.02)
    raise AssertionError(f"no backup of {host} got going within {timeout} s")


def wait_for_lock(home: Path, host: str, timeout: float = 60.0) -> None:
    """Block until some job holds the host's lock (its record is written once the lock is taken)."""
    lock = home / "store" / host / "lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip():
            return
        time.sleep(0.02)
    raise AssertionError(f"no job took {host}'s lock within {timeout} s")
