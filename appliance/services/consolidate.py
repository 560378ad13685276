# SPDX-License-Identifier: GPL-2.0-or-later
"""Consolidation: apply a host's retention policy by merging dropped points into their children.

Dropping point P (whose child is C, the next newer point) costs in proportion to C's own data, never
to the disk's size, and never copies the base:
  1. mark P `dropping` in the catalog (P is then never offered again: its file is about to change);
  2. `qemu-img commit -d C`: C's clusters are written into P's file. At every moment C (and every
     point above it) reads exactly as before: P's file only gains clusters that C shadows anyway;
  3. fsync, then rename P's file over C's file name: atomic; the points above C find their backing
     file under the same name, now holding C's view merged with P's;
  4. remove P from the catalog (atomically replaced).
A crash anywhere is finished by the next run: a point marked dropping whose file still exists is
committed into again (committing C twice gives the same result), one whose file is gone was renamed.
Kept points read byte for byte as before, and no file is left behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from appliance.domain.chain import Chain
from appliance.domain.models import Host, Point
from appliance.domain.retention import DEFER, DROP, Decision, RetentionPolicy, plan
from appliance.errors import ChainCorruptError, ChainError
from appliance.faults import checkpoint
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.backup import remove_leftovers
from appliance.store import catalog, hosts, recovery
from appliance.store.files import fsync_dir
from appliance.store.layout import Home
from appliance.store.lock import HostLock

log = get_logger(__name__)


def policy_of(host: Host) -> RetentionPolicy:
    return RetentionPolicy(host.keep_last, host.keep_hourly, host.keep_daily, host.keep_weekly, host.keep_monthly)


@dataclass(slots=True)
class Report:
    host: str
    policy: RetentionPolicy
    decisions: list[Decision]
    merged: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def deferred(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == DEFER]


def consolidate(home: Home, tools: Tools, name: str, *, dry_run: bool = False, wait: float = 0.0) -> Report:
    """Plan (and unless `dry_run`, apply) the host's retention policy.

    :raises ChainLockedError: another job holds the host (after waiting `wait` seconds).
    :raises ChainCorruptError, StoreFullError, ImageToolError: a merge failed; the chain is readable as
        before and the next run finishes the job.
    """
    started = time.monotonic()
    host = hosts.load(home, name)
    policy = policy_of(host)
    with HostLock(home.chain_dir(name) / "lock", name, "consolidation", wait=wait):
        chain = catalog.load(home.chain_dir(name), name)
        remove_leftovers(home, tools, chain)
        if not dry_run:
            chain = _finish_interrupted(home, tools, chain)
        decisions = plan([p for p in chain.points if not p.dropping], policy, recovery.pinned_points(home, name))
        report = Report(name, policy, decisions)
        if dry_run:
            return report
        for decision in decisions:
            if decision.action == DROP:
                chain = _drop(home, tools, chain, chain.find(decision.point))
                report.merged.append(decision.point)
        report.seconds = time.monotonic() - started
    log.info("chain.consolidated", host=name, merged=len(report.merged), deferred=len(report.deferred),
             kept=len(chain.points), seconds=round(report.seconds, 2))  # fmt: skip
    return report


def drop_point(home: Home, tools: Tools, name: str, point_ref: str, *, wait: float = 0.0) -> Point:
    """Merge one point away by hand (the same crash-safe merge as consolidation); pinned points refused.

    :raises ChainError: the point is the newest, pinned, or older than a pinned point.
    """
    with HostLock(home.chain_dir(name) / "lock", name, "consolidation", wait=wait):
        chain = catalog.load(home.chain_dir(name), name)
        point = chain.find(point_ref)
        pins = recovery.pinned_points(home, name)
        for pinned in [p for p in chain.points[chain.index(point.id) :] if p.id in pins]:
            raise ChainError(f"{name}: point {pinned.id} is in use ({pins[pinned.id]}); not merging {point.id}")
        _drop(home, tools, chain, point)
        return point


def _finish_interrupted(home: Home, tools: Tools, chain: Chain) -> Chain:
    for point in [p for p in chain.points if p.dropping]:
        log.warning("chain.merge_resumed", host=chain.host, point=point.id)
        chain = _drop(home, tools, chain, point)
    return chain


def _drop(home: Home, tools: Tools, chain: Chain, point: Point) -> Chain:
    """Merge `point` into its child, disk by disk, and remove it from the catalog. See the module doc."""
    chain_dir = home.chain_dir(chain.host)
    index = chain.index(point.id)
    if index == len(chain.points) - 1:
        raise ChainCorruptError(f"{chain.host}: refusing to drop the newest point {point.id}")
    child = chain.points[index + 1]
    child_slots = {d.slot for d in child.disks}
    pending = [d for d in point.disks if (chain_dir / d.file).exists() and d.slot in child_slots]
    for disk in pending:  # before anything changes: a damaged point stops the merge with all kept as it was
        tools.images.check(chain_dir / disk.file)
        tools.images.check(chain_dir / child.disk(disk.slot).file)
    if not point.dropping:
        point = replace(point, dropping=True)
        chain = chain.with_point(point)
        catalog.save(chain_dir, chain)
        checkpoint("consolidate.marked")
    for disk in point.disks:
        merged = chain_dir / disk.file
        if not merged.exists():
            continue  # this disk was merged and renamed before an interruption
        if disk.slot not in child_slots:
            merged.unlink()  # the disk was removed from the host after this point: nothing reads it
            continue
        target = child.disk(disk.slot)
        top = chain_dir / target.file
        tools.images.commit(top)
        checkpoint("consolidate.committed")
        if tools.images.virtual_size(merged) != tools.images.virtual_size(top):
            tools.images.resize(merged, target.size)  # the child's disk had shrunk
        _fsync(merged)
        os.rename(merged, top)
        fsync_dir(top.parent)
        checkpoint("consolidate.renamed")
    chain = Chain(chain.host, tuple(p for p in chain.points if p.id != point.id))
    catalog.save(chain_dir, chain)
    log.info("chain.merged", host=chain.host, point=point.id, into=child.id)
    return chain


def _fsync(path: os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
