# SPDX-License-Identifier: GPL-2.0-or-later
"""Consolidation: apply a host's retention policy by merging dropped points into their children.

Dropping point P (whose child is C, the next newer point) costs in proportion to C's own data, never
to the disk's size, and never copies the base: C's clusters are committed into P's file, which then
takes C's name. The chain's transaction does the merge (store/chains.py says why it is crash-safe);
this use case decides which points go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from appliance.domain.models import Host, Point
from appliance.domain.retention import DEFER, DROP, Decision, RetentionPolicy, plan
from appliance.errors import ChainError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.store import chains, hosts, journal
from appliance.store.layout import Home

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
    policy = policy_of(hosts.load(home, name))
    with chains.open(home, tools.images, name, "consolidation", wait=wait) as tx:
        if not dry_run:
            tx.finish_merges()
        decisions = plan([p for p in tx.chain.points if not p.dropping], policy, tx.pins(), tx.holds())
        report = Report(name, policy, decisions)
        if dry_run:
            return report
        for decision in decisions:
            if decision.action == DROP:
                point = tx.chain.find(decision.point)
                tx.merge(point)
                report.merged.append(decision.point)
                _remember(home, name, point, tx.chain.points)
        report.seconds = time.monotonic() - started
        kept = len(tx.chain.points)
    log.info("chain.consolidated", host=name, merged=len(report.merged), deferred=len(report.deferred),
             kept=kept, seconds=round(report.seconds, 2))  # fmt: skip
    return report


def _remember(home: Home, host: str, point: Point, remaining: tuple[Point, ...]) -> None:
    """The merged point on the host's timeline: what it was, and which newer point holds it now."""
    into = next((p.id for p in remaining if p.created > point.created), "")
    journal.remember_merged(home, journal.Merged(host, point.id, point.created, into, datetime.now(UTC)))


def drop_point(home: Home, tools: Tools, name: str, point_ref: str, *, wait: float = 0.0) -> Point:
    """Merge one point away by hand (the same crash-safe merge as consolidation); pinned points refused.

    :raises ChainError: the point is the newest, pinned, or older than a pinned point.
    """
    with chains.open(home, tools.images, name, "consolidation", wait=wait) as tx:
        point = tx.chain.find(point_ref)
        pins = tx.pins()
        for pinned in [p for p in tx.chain.points[tx.chain.index(point.id) :] if p.id in pins]:
            raise ChainError(f"{name}: point {pinned.id} is in use ({pins[pinned.id]}); not merging {point.id}")
        held = tx.holds()
        if point.id in held:
            raise ChainError(f"{name}: point {point.id} is held for {held[point.id]}; not merging it",
                             hint="it can be merged once that site confirms a newer point")  # fmt: skip
        tx.merge(point)
        _remember(home, name, point, tx.chain.points)
        return point
