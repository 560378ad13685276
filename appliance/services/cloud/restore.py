# SPDX-License-Identifier: GPL-2.0-or-later
"""`cloud restore`: a bucket's point back as raw disks (`--to` a file or a device) or as the host's newest
local point (`--to-store`), checked against the point's digest before it says done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from appliance.domain.cloud import CloudPoint
from appliance.domain.models import Point
from appliance.errors import CloudObjectError, ConfigError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.backup import Import, record_point
from appliance.services.cloud.bucket import Say, cloud_host, each_block, locate, mib
from appliance.services.cloud_reader import DiskReader, PackHeaders
from appliance.store import chains
from appliance.store.layout import Home

log = get_logger(__name__)


def restore(home: Home, tools: Tools, name: str, host: str, point_id: str | None, target: Path,
            say: Say = lambda _: None) -> tuple[CloudPoint, int]:  # fmt: skip
    """Write a point's first disk (or each disk, to TARGET.N for disk N > 0) as raw bytes to a file or a
    block device; returns the point and the bytes fetched. Zero blocks are written only to a device."""
    located = locate(home, tools, name, host, point_id)
    opened, point = located.opened, located.point
    headers = PackHeaders(opened.bucket, opened.sealer)
    fetched = 0
    for i, disk in enumerate(point.disks):
        path = target if i == 0 else target.with_name(f"{target.name}.{i}")
        reader = DiskReader(opened.bucket, opened.sealer, point, disk, headers)
        _write_disk(reader, path)
        fetched += reader.fetched_bytes
        say(f"{disk.slot} -> {path}: {disk.size} bytes, {mib(reader.fetched_bytes)} fetched")
    return point, fetched


def _write_disk(reader: DiskReader, path: Path) -> None:
    """To a file (sparse: zero blocks are not written) or a block device (every block)."""
    is_device = path.exists() and path.is_block_device()
    try:
        with open(path, "r+b" if is_device else "wb") as out:
            if not is_device:
                out.truncate(reader.disk.size)

            def write(offset: int, data: bytes) -> None:
                out.seek(offset)
                out.write(data)

            _copy_checked(reader, write, zeroes=is_device)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise ConfigError(f"cannot write the restore to {path} ({exc.strerror})") from exc


def _copy_checked(reader: DiskReader, write: Callable[[int, bytes], None], *, zeroes: bool) -> None:
    """Every block in order through `write`, checked as a whole against the point's digest: a restore is
    done only when what it wrote is the point, byte for byte."""

    def take(block: int, data: bytes, zero: bool) -> None:
        if not zero or zeroes:
            write(block * reader.disk.block_size, data)

    if each_block(reader, take) != reader.disk.digest:
        raise CloudObjectError(f"the restored {reader.disk.slot} of {reader.point.host} does not make the point's "
                               "digest",
                               hint="`appliance cloud verify STORE --deep` names the damaged object")  # fmt: skip


def restore_to_store(home: Home, tools: Tools, name: str, host_name: str, point_id: str | None,
                     say: Say = lambda _: None) -> Point:  # fmt: skip
    """Bring a bucket's point back as the newest point of the host's local chain (a new appliance after a
    disaster: backups go on from it, incremental, and it fails over locally). The disks are written through
    QEMU into a scratch qcow2 and checked against the point's digest, then taken in as a backup takes a
    point in: only the blocks that differ from the chain's newest point are written."""
    located = locate(home, tools, name, host_name, point_id)
    point = located.point
    host = cloud_host(home, host_name, name, point.settings)
    headers = PackHeaders(located.opened.bucket, located.opened.sealer)
    with chains.open(home, tools.images, host_name, "cloud restore", wait=60.0) as tx:
        if any(p.id == point.point for p in tx.chain.points):
            raise ConfigError(f"{host_name} already has point {point.point} here")
        sources = []
        for index, disk in enumerate(point.disks):
            scratch = tx.run_dir / f"cloud-{disk.slot}.qcow2"
            scratch.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tools.images.create(scratch, disk.size)
            reader = DiskReader(located.opened.bucket, located.opened.sealer, point, disk, headers)
            with tools.images.export(scratch, tx.run_dir, writable=True) as exported:
                _copy_checked(reader, exported.write, zeroes=False)
                exported.flush()
            say(f"{disk.slot}: {mib(reader.fetched_bytes)} fetched, digest checked")
            source = host.disks[index] if index < len(host.disks) else disk.slot
            sources.append((source, scratch, disk.size))
        made = record_point(tx, Import(tx, tools, host, sources, f"cloud store {name}",
                                       point=(point.point, point.created)), "cloud restore")  # fmt: skip
        for scratch_file in (s[1] for s in sources):
            scratch_file.unlink(missing_ok=True)
    if [d.digest for d in made.disks] != [d.digest for d in point.disks]:
        raise CloudObjectError(f"{host_name}'s restored point {made.id} does not read back as the bucket's")
    log.info("cloud.restored_to_store", store=name, host=host_name, point=made.id)
    return made
