# SPDX-License-Identifier: GPL-2.0-or-later
"""The scheduler: backups at each host's interval (each followed by verification of the new point),
consolidation of every host once a day.

One job at a time, in the order they fall due. A failing host is logged and retried at its own
interval; the others keep their schedule. A stop request (SIGTERM) is honoured between jobs, never in
the middle of one, so no job is ever cut short by the daemon itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as time_of_day
from typing import Protocol

from appliance.domain.schedule import ALL_HOSTS, BACKUP, Job, due_jobs
from appliance.errors import ApplianceError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.backup import back_up
from appliance.services.consolidate import consolidate
from appliance.services.failover import verify_boot
from appliance.services.verify import verify_chain
from appliance.store import hosts, schedule
from appliance.store.layout import Home

log = get_logger(__name__)


class Clock(Protocol):
    def now(self) -> datetime: ...
    def sleep(self, seconds: float, stop: threading.Event) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        stop.wait(seconds)


Runner = Callable[[Job], str]  # runs a job, returns a one-line summary; raises ApplianceError on failure


@dataclass(slots=True)
class Scheduler:
    home: Home
    runner: Runner
    clock: Clock
    consolidate_at: time_of_day
    stop: threading.Event
    max_sleep: float = 60.0  # re-read the host list at least this often
    started: datetime | None = None

    def next_jobs(self) -> list[Job]:
        intervals = [(h.name, h.interval) for h in hosts.load_all(self.home)[0]]  # a damaged record: not scheduled
        last = {key: o.started for key, o in schedule.load(self.home).items()}
        return due_jobs(intervals, last, self.clock.now(), self.consolidate_at, self.started)

    def run(self) -> None:
        self.started = self.clock.now()
        log.info("daemon.started", consolidate_at=self.consolidate_at.strftime("%H:%M"))
        while not self.stop.is_set():
            job = self.next_jobs()[0]
            wait = (job.due - self.clock.now()).total_seconds()
            if wait > 0:
                self.clock.sleep(min(wait, self.max_sleep), self.stop)
                continue
            self.run_job(job)
        log.info("daemon.stopped")

    def run_job(self, job: Job) -> None:
        started, t0 = self.clock.now(), time.monotonic()
        log.info("job.started", kind=job.kind, host=job.host)
        try:
            message, ok = self.runner(job), True
        except ApplianceError as exc:
            message, ok = exc.message, False
        except Exception as exc:  # a bug in one job must not stop the schedule of every host
            message, ok = f"internal error: {type(exc).__name__}: {exc}", False
            log.exception("job.crashed", kind=job.kind, host=job.host)
        seconds = time.monotonic() - t0
        schedule.record(self.home, schedule.Outcome(job.kind, job.host, started, round(seconds, 2), ok, message))
        (log.info if ok else log.error)("job.finished", kind=job.kind, host=job.host, ok=ok, message=message)


def run_job(home: Home, tools: Tools, job: Job) -> str:
    """What each kind of job does (the real runner)."""
    if job.kind == BACKUP:
        point = back_up(home, tools, job.host)
        checks = verify_chain(home, tools, job.host, point_ref=point.id)
        summary = f"point {point.id}, changed {point.changed_bytes} B, verified {'ok' if checks[0].ok else 'FAILED'}"
        if not checks[0].ok:
            raise ApplianceError(f"{summary}: {checks[0].summary}")
        if hosts.load(home, job.host).verify_boot:
            verdict = verify_boot(home, tools, job.host, point_ref=point.id)
            summary += f", boot {'ok' if verdict['ok'] else 'FAILED'}"
        return summary
    failures = []
    merged = 0
    for name in hosts.names(home) if job.host == ALL_HOSTS else [job.host]:
        try:
            merged += len(consolidate(home, tools, name, wait=600.0).merged)
        except ApplianceError as exc:
            failures.append(f"{name}: {exc.message}")
    if failures:
        raise ApplianceError(f"merged {merged} points; failed: {'; '.join(failures)}")
    return f"merged {merged} points"
