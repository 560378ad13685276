# SPDX-License-Identifier: GPL-2.0-or-later
"""What the appliance knows of each host, its store, its recovery VMs and its jobs: the one source the
web console, its JSON API, the alerts, the metrics and `appliance status` all read. Nothing here changes
anything; every answer is read from the store as it is now."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as time_of_day
from pathlib import Path

from appliance.domain import health
from appliance.domain.models import Host, Point
from appliance.domain.schedule import BACKUP
from appliance.errors import ApplianceError
from appliance.ports import Tools
from appliance.services import daemon, failback, failover
from appliance.services.failback import Progress as FailbackProgress
from appliance.store import catalog, hosts, journal, recovery, schedule, sites, usage
from appliance.store.cloud import cloud_holds
from appliance.store.layout import Home

RECENT_JOBS = 50


@dataclass(frozen=True, slots=True)
class BootCheck:
    """A point's last boot verification."""

    point: str
    time: str
    ok: bool
    detail: str
    rto_seconds: float | None
    screenshot: bool  # a screenshot was kept (served by the console)


@dataclass(frozen=True, slots=True)
class HostStatus:
    name: str
    state: str  # domain.health: protected | late | failing | never
    interval: float
    late_after: float  # age of the newest point past which the host is late (0: never late)
    newest: str | None  # point id
    newest_time: datetime | None
    age_seconds: float | None
    points: int
    failures_in_row: int
    last_error: str
    last_error_time: datetime | None
    last_backup_seconds: float
    last_backup_bytes: int  # changed bytes of the newest point
    verification: str  # ok | failed | unverified (of the newest point)
    boot: BootCheck | None  # the newest boot verification of any point (it may have failed)
    booted: BootCheck | None  # the newest point that booted in its verification
    offsite: dict[str, str]  # DR site or cloud store -> the newest point of this host it holds
    replica_of: str = ""
    error: str = ""  # the host's record or chain does not read


@dataclass(frozen=True, slots=True)
class StoreUsage:
    used: int
    total: int
    percent: float
    days_until_full: float | None


@dataclass(frozen=True, slots=True)
class VmStatus:
    host: str
    name: str
    point: str
    purpose: str
    state: str  # what libvirt says now
    recorded: str  # what the appliance recorded: running | stopped (kept)
    started: datetime
    rto_seconds: float | None
    accel: str
    vnc: str
    failback: FailbackProgress | None = None

    @property
    def stopped_unexpectedly(self) -> bool:
        """Recorded as running, but not running: it crashed, or was stopped behind the appliance's back."""
        return self.purpose == "failover" and self.recorded == "running" and self.state != "running"


@dataclass(frozen=True, slots=True)
class Overview:
    time: datetime
    hosts: list[HostStatus]
    store: StoreUsage
    vms: list[VmStatus] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PointStatus:
    id: str
    created: datetime
    changed_bytes: int
    sent_bytes: int
    seconds: float
    consistency: str
    verification: str
    verification_detail: str
    boot: BootCheck | None
    pinned: str


@dataclass(frozen=True, slots=True)
class HostDetail:
    status: HostStatus
    points: list[PointStatus]
    jobs: list[journal.Entry]  # newest last
    errors: list[journal.Entry]  # failed jobs, newest last
    merged: list[journal.Merged]  # points consolidation merged away, oldest first


def overview(home: Home, tools: Tools, now: datetime | None = None, *, with_vms: bool = True) -> Overview:
    now = now or datetime.now(UTC)
    found, unreadable = hosts.load_all(home)
    backups: dict[str, list[journal.Entry]] = {}
    for entry in journal.load(home, kind=BACKUP):
        backups.setdefault(entry.host, []).append(entry)
    statuses = [host_status(home, h, now, backups.get(h.name, [])) for h in found]
    statuses += [_unreadable(name, exc.message) for name, exc in unreadable.items()]
    return Overview(now, sorted(statuses, key=lambda s: s.name), store_usage(home, now),
                    vm_statuses(home, tools) if with_vms else [])  # fmt: skip


def store_usage(home: Home, now: datetime) -> StoreUsage:
    samples = usage.sample(home, now)
    current = samples[-1]
    return StoreUsage(current.used, current.total, round(health.usage_percent(current.used, current.total), 1),
                      health.days_until_full(samples))  # fmt: skip


def host_status(home: Home, host: Host, now: datetime, backups: list[journal.Entry] | None = None) -> HostStatus:
    """One host's state; `backups`: its backup jobs from the journal, oldest first (read if not given)."""
    try:
        chain = catalog.load(home.chain_dir(host.name), host.name)
    except ApplianceError as exc:
        return _unreadable(host.name, exc.message)
    backups = journal.load(home, host=host.name, kind=BACKUP) if backups is None else backups
    newest = chain.newest
    failed = [e for e in backups if not e.ok]
    # A failure older than the newest point was mended by a later backup (the CLI's, say): it no longer counts.
    last_ok: bool | None = None
    if backups:
        last_ok = backups[-1].ok or (newest is not None and newest.created > backups[-1].started)
    elif newest is not None:
        last_ok = True
    seconds = newest.seconds if newest else 0.0
    state = health.classify(now=now, newest=newest.created if newest else None, interval=host.interval,
                            last_backup_seconds=seconds, last_backup_ok=last_ok)  # fmt: skip
    return HostStatus(
        name=host.name, state=state, interval=host.interval, late_after=health.late_after(host.interval, seconds),
        newest=newest.id if newest else None, newest_time=newest.created if newest else None,
        age_seconds=(now - newest.created).total_seconds() if newest else None, points=len(chain.points),
        failures_in_row=0 if last_ok else health.failures_in_row([e.ok for e in backups]),
        last_error=failed[-1].message if failed else "", last_error_time=failed[-1].started if failed else None,
        last_backup_seconds=seconds, last_backup_bytes=newest.changed_bytes if newest else 0,
        verification=_verification(newest), boot=_newest_boot(home, host.name, chain.points),
        booted=_newest_boot(home, host.name, chain.points, booted=True),
        offsite=offsite(home, host.name), replica_of=host.replica_of,
    )  # fmt: skip


def _unreadable(name: str, why: str) -> HostStatus:
    return HostStatus(name=name, state=health.FAILING, interval=0, late_after=0, newest=None, newest_time=None,
                      age_seconds=None, points=0, failures_in_row=0, last_error=why, last_error_time=None,
                      last_backup_seconds=0, last_backup_bytes=0, verification="unverified", boot=None, booted=None,
                      offsite={}, error=why)  # fmt: skip


def _verification(point: Point | None) -> str:
    if point is None or point.verification is None:
        return "unverified"
    return "ok" if point.verification.ok else "failed"


def boot_check(home: Home, host: str, point: Point) -> BootCheck | None:
    verdict = point.extra.get("boot")
    if not isinstance(verdict, dict):
        return None
    rto = verdict.get("rto_seconds")
    return BootCheck(point=point.id, time=str(verdict.get("time", "")), ok=bool(verdict.get("ok")),
                     detail=str(verdict.get("detail", "")), rto_seconds=rto if isinstance(rto, int | float) else None,
                     screenshot=home.screenshot(host, point.id).exists())  # fmt: skip


def _newest_boot(home: Home, host: str, points: tuple[Point, ...], *, booted: bool = False) -> BootCheck | None:
    """The newest boot verification (of a point that booted, if `booted`)."""
    for point in reversed(points):
        found = boot_check(home, host, point)
        if found is not None and (found.ok or not booted):
            return found
    return None


def offsite(home: Home, host: str) -> dict[str, str]:
    """Each DR site granted here and each cloud store -> the newest point of `host` it confirmed holding."""
    held = {f"site {site}": points[host] for site, points in sites.confirmed(home).items() if points and host in points}
    held.update({why.removeprefix("the newest point in "): point for point, why in cloud_holds(home, host).items()})
    return held


def screenshot(home: Home, host: str, point_id: str) -> Path | None:
    """The boot verification screenshot of a point, if one was kept (the host's name is checked by Home)."""
    hosts.load(home, host)
    chain = catalog.load(home.chain_dir(host), host)
    point = chain.find(point_id)
    path = home.screenshot(host, point.id)
    return path if path.exists() else None


def host_detail(home: Home, name: str, now: datetime | None = None) -> HostDetail:
    """:raises HostNotFoundError: no such host."""
    now = now or datetime.now(UTC)
    host = hosts.load(home, name)
    chain = catalog.load(home.chain_dir(name), name)
    pins = {**recovery.pinned_points(home, name), **cloud_holds(home, name), **sites.replication_holds(home, name)[0]}
    points = [
        PointStatus(
            id=p.id,
            created=p.created,
            changed_bytes=p.changed_bytes,
            sent_bytes=p.sent_bytes,
            seconds=p.seconds,
            consistency=p.consistency.label if p.consistency else "-",
            verification=_verification(p),
            verification_detail=p.verification.detail if p.verification else "",
            boot=boot_check(home, name, p),
            pinned=pins.get(p.id, ""),
        )  # fmt: skip
        for p in chain.points
    ]
    entries = journal.load(home, host=name)
    jobs = entries[-RECENT_JOBS:]
    backups = [e for e in entries if e.kind == BACKUP]
    return HostDetail(host_status(home, host, now, backups), points, jobs, [j for j in jobs if not j.ok],
                      journal.merged(home, name))  # fmt: skip


def vm_statuses(home: Home, tools: Tools) -> list[VmStatus]:
    """Every recovery VM (failover and boot verification) with libvirt's word on it and its failback."""
    return [
        VmStatus(
            host=vm.host,
            name=vm.name,
            point=vm.point,
            purpose=vm.purpose,
            state=shown,
            recorded=vm.state,
            started=vm.started,
            rto_seconds=vm.rto_seconds,
            accel=vm.accel,
            vnc=vm.vnc,
            failback=failback.status(home, vm.host) if vm.purpose == "failover" else None,
        )  # fmt: skip
        for vm, shown in failover.status(home, tools)
    ]


@dataclass(frozen=True, slots=True)
class Jobs:
    upcoming: list[tuple[str, str, datetime]]  # kind, host (or site/store), when due
    history: list[journal.Entry]  # newest last


def jobs(home: Home, consolidate_at: time_of_day, now: datetime | None = None, limit: int = 200) -> Jobs:
    """The scheduler's queue (what falls due when) and the journal of finished jobs."""
    now = now or datetime.now(UTC)
    try:
        last = schedule.load(home)
    except ApplianceError:
        last = {}
    plan = daemon.upcoming(home, last, now, consolidate_at)
    return Jobs([(j.kind, j.host, j.due) for j in plan.jobs], journal.load(home, limit=limit))
