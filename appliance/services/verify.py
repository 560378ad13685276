# SPDX-License-Identifier: GPL-2.0-or-later
"""Integrity of stored points: qcow2 metadata, the backing chain, and the content digest.

The content check reads each point back through QEMU (the same view a recovery VM would get) and
recomputes the digest the host computed while reading the source disk. Ranges that `qemu-img map`
reports as zero are not read: their block hashes are known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from appliance.domain.blocks import DiskDigest
from appliance.domain.models import DiskPoint, Point, Verification
from appliance.errors import ApplianceError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.image_reader import read_chunks
from appliance.store import chains, hosts
from appliance.store.chains import ChainTx
from appliance.store.hashes import digest_of
from appliance.store.layout import Home

log = get_logger(__name__)


@dataclass(slots=True)
class DiskCheck:
    slot: str
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PointCheck:
    point: str
    disks: list[DiskCheck]

    @property
    def ok(self) -> bool:
        return not any(d.problems for d in self.disks)

    @property
    def summary(self) -> str:
        return "; ".join(f"{d.slot}: {p}" for d in self.disks for p in d.problems) or "ok"


def verify_chain(
    home: Home,
    tools: Tools,
    name: str,
    *,
    point_ref: str | None = None,
    repair: bool = False,
    on_point: Callable[[PointCheck], None] | None = None,
) -> list[PointCheck]:
    """Check every point of a host's chain (or one), record each verdict in the catalog, return them.

    `repair` rebuilds the newest point's block hash list from the point if it is missing or damaged.
    """
    hosts.load(home, name)  # an unknown host is an error, not an empty chain
    with chains.open(home, tools.images, name, "verify", wait=5.0) as tx:
        targets = [tx.chain.find(point_ref)] if point_ref else list(tx.chain.points)
        results = []
        for point in targets:
            check = _check_point(tx, tools, point, repair=repair)
            results.append(check)
            tx.record(point.verified(Verification(datetime.now(UTC), check.ok, check.summary)))
            log.info("point.verified", host=name, point=point.id, ok=check.ok, detail=check.summary)
            if on_point:
                on_point(check)
        return results


def _check_point(tx: ChainTx, tools: Tools, point: Point, *, repair: bool) -> PointCheck:
    chain = tx.chain
    upto = chain.points[: chain.index(point.id) + 1]
    checks = []
    for disk in point.disks:
        check = DiskCheck(disk.slot)
        expected = [p.disk(disk.slot).file for p in reversed(upto) if any(d.slot == disk.slot for d in p.disks)]
        try:
            _check_structure(tools, tx.dir, expected, check)
            if not check.problems:
                _check_content(
                    tx, tools, point, disk, check, rebuild_hashes=point.id == chain.points[-1].id, repair=repair
                )
        except ApplianceError as exc:
            check.problems.append(exc.message)
        checks.append(check)
    return PointCheck(point.id, checks)


def _check_structure(tools: Tools, chain_dir: Path, expected: list[str], check: DiskCheck) -> None:
    """qemu-img check of the file, and a backing chain that is exactly the chain's earlier points."""
    top = chain_dir / expected[0]
    if not top.exists():
        check.problems.append(f"{expected[0]} is missing")
        return
    tools.images.check(top)
    infos = tools.images.info_chain(top)
    actual = [str(Path(i["filename"]).resolve()) for i in infos]
    wanted = [str((chain_dir / f).resolve()) for f in expected]
    if actual != wanted:
        check.problems.append(f"backing chain is {_names(actual)}, expected {_names(wanted)}")
        return
    for info in infos[:-1]:
        backing = info.get("backing-filename", "")
        if backing.startswith("/") or info.get("backing-filename-format") != "qcow2":
            check.problems.append(
                f"{Path(info['filename']).name} must name its backing file by relative path, as qcow2"
            )


def _names(paths: list[str]) -> str:
    return " <- ".join(Path(p).name for p in reversed(paths))


def _check_content(tx: ChainTx, tools: Tools, point: Point, disk: DiskPoint, check: DiskCheck, *,
                   rebuild_hashes: bool, repair: bool) -> None:  # fmt: skip
    list_path = tx.hash_list(point.id, disk.slot)
    collected: list[bytes] | None = [] if (rebuild_hashes and repair) else None
    digest = DiskDigest()
    for chunk in read_chunks(tools, tx.file(disk.file), tx.run_dir, disk.size, disk.block_size):
        digest.add(chunk.hashes)
        if collected is not None:
            collected.append(chunk.hashes)
    found = digest.hexdigest()
    if found != disk.digest:
        check.problems.append(
            f"content digest {found[:16]} differs from the one recorded at capture {disk.digest[:16]}"
        )
        return
    if rebuild_hashes:
        intact = list_path.exists() and digest_of(list_path) == disk.digest
        if not intact and collected is not None:
            tx.write_hash_list(point.id, disk.slot, b"".join(collected))
            log.warning("hashes.rebuilt", point=point.id, disk=disk.slot)
        elif not intact:
            check.problems.append(
                "the block hash list used by the next incremental is missing or damaged (use --repair)"
            )
