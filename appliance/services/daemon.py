# SPDX-License-Identifier: GPL-2.0-or-later
"""The scheduler: backups at each host's interval (each followed by verification of the new point),
each host's consolidation once a day, and each site's replication at its interval inside its window.

Jobs of different hosts run side by side, at most `jobs` at once, started in the order they fall due;
a host never has two jobs at once (the store's host lock would refuse the second). So a host that is
slow, or hangs until its job's deadline, holds one slot and delays only its own jobs. A failing host is
logged and retried at its own interval; a job that crashes (a bug) is recorded as failed like any other.
A host whose record is damaged is logged once and left out until it is repaired; a damaged history is
logged and taken as empty. A stop request (SIGTERM) stops the starting of jobs and waits for the running
ones: no job is ever cut short by the daemon itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as time_of_day
from typing import Protocol

from appliance.domain.models import Site
from appliance.domain.schedule import BACKUP, PUSH, REPLICATE, Job, Window, due_jobs, jobs_to_start, parse_window
from appliance.errors import ApplianceError, DamagedFileError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.backup import back_up
from appliance.services.cloud.push import push
from appliance.services.consolidate import consolidate
from appliance.services.failover import verify_boot
from appliance.services.reader_pool import ReaderPool
from appliance.services.replicate import HostReport, replicate
from appliance.services.verify import verify_chain
from appliance.store import cloud as cloud_records
from appliance.store import hosts, journal, schedule, sites
from appliance.store.cloud import CloudStore
from appliance.store.layout import Home

log = get_logger(__name__)

# Jobs at once. A job holds its slot until it ends, and a stuck host's job may last until its deadline
# (hours for a big disk at the minimum rate): with 4, three such hosts still leave a slot for the rest.
# Each job is mostly waiting on the network, the host and child processes, so a few side by side cost
# the appliance little; more would split its disk and network between more streams for no gain.
DEFAULT_JOBS = 4
PUSH_WAIT = 3600.0  # seconds a push after a point waits for another host's push to the same store


class Clock(Protocol):
    def now(self) -> datetime: ...
    def sleep(self, seconds: float, wake: threading.Event) -> None:
        """Wait `seconds`, or less if `wake` is set."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        wake.wait(seconds)  # monotonic: a jump of the wall clock neither shortens nor stretches it


Runner = Callable[[Job], str]  # runs a job, returns a one-line summary; raises ApplianceError on failure


@dataclass(frozen=True, slots=True)
class Plan:
    jobs: list[Job]  # soonest first
    unreadable: dict[str, str]  # host name -> why its record cannot be read


def read_intervals(home: Home) -> tuple[list[tuple[str, float]], dict[str, str]]:
    """Each readable host's backup interval, and the hosts whose record is damaged (with the reason)."""
    found, unreadable = hosts.load_all(home)
    return [(h.name, h.interval) for h in found], {name: exc.message for name, exc in unreadable.items()}


def read_replications(home: Home) -> list[tuple[str, float, Window | None]]:
    """Each site's replication interval and window (a site whose record does not read is left out)."""
    return _timed(sites.names(home), lambda name: sites.load(home, name), "site")


def read_pushes(home: Home) -> list[tuple[str, float, Window | None]]:
    """Each cloud store's push interval and window (0: it is pushed to after each new point instead)."""
    return _timed(cloud_records.names(home), lambda name: cloud_records.load(home, name), "cloud store")


def _timed(
    names: list[str], load: Callable[[str], Site | CloudStore], what: str
) -> list[tuple[str, float, Window | None]]:
    out = []
    for name in names:
        try:
            record = load(name)
            out.append((name, record.interval, parse_window(record.window)))
        except ApplianceError as exc:
            log.error("daemon.record_unreadable", kind=what, name=name, error=exc.message)
    return out


def upcoming(home: Home, history: Mapping[tuple[str, str], schedule.Outcome], now: datetime,
             consolidate_at: time_of_day) -> Plan:  # fmt: skip
    """What `appliance schedule` shows: every job with when it is due."""
    intervals, unreadable = read_intervals(home)
    last = {key: o.started for key, o in history.items()}
    return Plan(due_jobs(intervals, last, now, consolidate_at, replications=read_replications(home),
                         pushes=read_pushes(home)), unreadable)  # fmt: skip


@dataclass(slots=True)
class Scheduler:
    home: Home
    runner: Runner
    clock: Clock
    consolidate_at: time_of_day
    jobs: int = DEFAULT_JOBS
    max_sleep: float = 60.0  # re-read the host list at least this often
    stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _running: dict[str, threading.Thread] = field(default_factory=dict, init=False)
    _first_seen: dict[str, datetime] = field(default_factory=dict, init=False)
    _started: dict[tuple[str, str], datetime] = field(default_factory=dict, init=False)  # by this process
    _unreadable: dict[str, str] = field(default_factory=dict, init=False)  # already logged
    _history_damaged: bool = field(default=False, init=False)

    @property
    def running(self) -> list[str]:
        """The hosts with a job running."""
        with self._lock:
            return sorted(self._running)

    def request_stop(self) -> None:
        """Start no more jobs; `run` returns when the running ones have ended."""
        self.stop.set()
        self._wake.set()

    def run(self) -> None:
        log.info("daemon.started", consolidate_at=self.consolidate_at.strftime("%H:%M"), jobs=self.jobs)
        while not self.stop.is_set():
            self._wake.clear()
            try:
                wait = self._start_due_jobs()
            except Exception:  # the loop itself must outlive a bug: every host depends on it
                log.exception("daemon.loop_failed")
                wait = self.max_sleep
            if not self.stop.is_set():
                self.clock.sleep(min(wait, self.max_sleep), self._wake)
        with self._lock:
            threads = list(self._running.values())
        if threads:
            log.info("daemon.stopping", waiting_for=[t.name for t in threads])
        for thread in threads:
            thread.join()
        log.info("daemon.stopped")

    def _start_due_jobs(self) -> float:
        """Start what is due; the seconds until the next job falls due (a job's end wakes us sooner)."""
        now = self.clock.now()
        jobs = self._plan(now)
        with self._lock:
            busy = set(self._running)
        start, next_due = jobs_to_start(jobs, now, busy, self.jobs - len(busy))
        for job in start:
            if self.stop.is_set():
                break
            self._start(job)
        return self.max_sleep if next_due is None else max(0.0, (next_due - now).total_seconds())

    def _plan(self, now: datetime) -> list[Job]:
        intervals, unreadable = read_intervals(self.home)
        self._report_unreadable(unreadable)
        for name, _ in intervals:
            if self._first_seen.setdefault(name, now) > now:  # the clock went back: anchor on the new time
                self._first_seen[name] = now
        last = {key: o.started for key, o in self._history().items()}
        with self._lock:  # what this process started is known even if its record could not be written
            last.update(self._started)
        return due_jobs(intervals, last, now, self.consolidate_at, self._first_seen, read_replications(self.home),
                        read_pushes(self.home))  # fmt: skip

    def _report_unreadable(self, unreadable: dict[str, str]) -> None:
        """Log each damaged host record once (and once more if it changes), and when it reads again."""
        for name, why in unreadable.items():
            if self._unreadable.get(name) != why:
                log.error("daemon.host_unreadable", host=name, file=str(self.home.host_record(name)), error=why,
                          action="no jobs for this host until its record is repaired")  # fmt: skip
        for name in self._unreadable.keys() - unreadable.keys():
            log.info("daemon.host_readable", host=name)
        self._unreadable = dict(unreadable)

    def _history(self) -> dict[tuple[str, str], schedule.Outcome]:
        try:
            history = schedule.load(self.home)
        except DamagedFileError as exc:
            if not self._history_damaged:
                log.error("daemon.history_unreadable", file=str(self.home.root / schedule.NAME), error=exc.message,
                          action="history taken as empty (every backup due now); the next job's outcome starts a "
                          f"new one and keeps the damaged file as {schedule.NAME}.damaged")  # fmt: skip
            self._history_damaged = True
            return {}
        if self._history_damaged:
            log.info("daemon.history_readable")
            self._history_damaged = False
        return history

    def _start(self, job: Job) -> None:
        thread = threading.Thread(target=self._run_in_thread, args=(job,), name=f"{job.kind} {job.host}")
        with self._lock:
            self._running[job.host] = thread
        try:
            thread.start()
        except BaseException:
            with self._lock:
                del self._running[job.host]
            raise

    def _run_in_thread(self, job: Job) -> None:
        try:
            self.run_job(job)
        finally:
            with self._lock:  # one step, so a sleeping clock sees either the job running or its end signalled
                del self._running[job.host]
                self._wake.set()

    def run_job(self, job: Job) -> None:
        """Run one job and record its outcome; never raises (a job's failure is its host's alone)."""
        started, t0 = self.clock.now(), time.monotonic()
        with self._lock:
            self._started[job.key] = started
        log.info("job.started", kind=job.kind, host=job.host)
        hint = ""
        try:
            message, ok = self.runner(job), True
        except ApplianceError as exc:
            message, ok, hint = exc.message, False, exc.hint or ""
        except Exception as exc:  # a bug in one job must not stop the schedule of every host
            message, ok = f"internal error: {type(exc).__name__}: {exc}", False
            log.exception("job.crashed", kind=job.kind, host=job.host)
        seconds = time.monotonic() - t0
        (log.info if ok else log.error)("job.finished", kind=job.kind, host=job.host, ok=ok, message=message)
        try:
            schedule.record(self.home, schedule.Outcome(job.kind, job.host, started, round(seconds, 2), ok, message))
            journal.append(self.home, journal.Entry(job.kind, job.host, started, round(seconds, 2), ok, message,
                                                    hint=hint))  # fmt: skip
        except Exception as exc:  # the disk is full, say: the scheduler still knows when the job ran
            log.error("job.not_recorded", kind=job.kind, host=job.host, error=str(exc))


def _replicated(home: Home, tools: Tools, report: HostReport) -> str:
    """One host of a replication run; its newest pulled point boot-verified here if the host asks for it
    (`host set NAME --verify-boot` at the DR site): a replicated point must boot here, not only there."""
    summary = f"{report.host}: {len(report.pulled)} pulled, newest here {report.newest_here or '-'}"
    return summary + (_boot_checked(home, tools, report.host, report.pulled[-1].id) if report.pulled else "")


def _boot_checked(home: Home, tools: Tools, host: str, point_id: str) -> str:
    """A new point of `host` booted in isolation if the host asks for it, as a job's summary says it."""
    if not hosts.load(home, host).verify_boot:
        return ""
    verdict = verify_boot(home, tools, host, point_ref=point_id)
    return f", boot {'ok' if verdict['ok'] else 'FAILED'}"


def run_job(home: Home, tools: Tools, job: Job, readers: ReaderPool | None = None) -> str:
    """What each kind of job does (the real runner). `readers`: the hosts' readers kept between points."""
    if job.kind == BACKUP:
        point = back_up(home, tools, job.host, pool=readers)
        checks = verify_chain(home, tools, job.host, point_ref=point.id)
        summary = f"point {point.id}, changed {point.changed_bytes} B, verified {'ok' if checks[0].ok else 'FAILED'}"
        if not checks[0].ok:
            raise ApplianceError(f"{summary}: {checks[0].summary}")
        return summary + _boot_checked(home, tools, job.host, point.id) + _pushed_after(home, tools, job.host)
    if job.kind == PUSH:
        return "; ".join(f"{r.host} {r.state} {r.point or ''}".strip() for r in push(home, tools, job.host))
    if job.kind == REPLICATE:
        reports = replicate(home, tools, job.host, in_window=True)
        return "; ".join(_replicated(home, tools, r) for r in reports)
    report = consolidate(home, tools, job.host, wait=600.0)
    deferred = f", {len(report.deferred)} deferred (in use)" if report.deferred else ""
    return f"merged {len(report.merged)} points{deferred}"


def _pushed_after(home: Home, tools: Tools, host: str, now: datetime | None = None) -> str:
    """A new point goes to each cloud store pushed to after each point (no interval), inside its window.
    A push that fails is said in the summary and retried after the next point: the backup stands."""
    said = []
    for name, interval, window in read_pushes(home):
        if interval > 0 or (window is not None and not window.is_open(now or datetime.now(UTC))):
            continue
        try:
            reports = push(home, tools, name, only=host, wait=PUSH_WAIT)
            said.append(f"pushed to {name}" if reports and reports[0].state == "sent" else f"{name} current")
        except ApplianceError as exc:
            log.error("daemon.push_failed", store=name, host=host, error=exc.message)
            said.append(f"push to {name} FAILED ({exc.message})")
    return "".join(f", {s}" for s in said)
