# SPDX-License-Identifier: GPL-2.0-or-later
"""What a console user's button starts: the same use cases the CLI and the scheduler run, each in a
thread of its own, recorded in the job journal with who pressed it.

A button returns at once (a backup or a boot takes minutes); the job's outcome shows on the Jobs page and
the host's page. Two jobs of one host never run at once here; a job the scheduler runs at the same time
on the same host is refused by the host's lock, and that refusal is the job's recorded outcome.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.domain.schedule import BACKUP, Job
from appliance.errors import ApplianceError, ChainLockedError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services import failback, failover
from appliance.services.daemon import run_job
from appliance.store import catalog, hosts, journal
from appliance.store.layout import Home

log = get_logger(__name__)
VERIFY_BOOT, FAILOVER, STOP_VM, CUTOVER = "verify-boot", "failover", "stop-vm", "cutover"


@dataclass(frozen=True, slots=True)
class Running:
    kind: str
    host: str
    user: str
    started: datetime


class ConsoleJobs:
    """The console's jobs under way, one per host at most."""

    def __init__(self, home: Home, tools: Tools) -> None:
        self._home, self._tools = home, tools
        self._lock = threading.Lock()
        self._running: dict[str, Running] = {}

    def running(self) -> list[Running]:
        with self._lock:
            return sorted(self._running.values(), key=lambda r: r.started)

    def back_up(self, host: str, user: str) -> Running:
        hosts.load(self._home, host)
        return self._start(BACKUP, host, user, lambda: run_job(self._home, self._tools, Job(BACKUP, host, _now())))

    def verify_boot(self, host: str, point: str, user: str) -> Running:
        self._point(host, point)

        def work() -> str:
            verdict = failover.verify_boot(self._home, self._tools, host, point_ref=point)
            if not verdict["ok"]:
                raise ApplianceError(f"point {point} did not boot: {verdict['detail']}")
            return f"point {point} booted in {verdict['rto_seconds']} s"

        return self._start(VERIFY_BOOT, host, user, work)

    def fail_over(self, host: str, point: str, user: str) -> Running:
        self._point(host, point)

        def work() -> str:
            vm = failover.fail_over(self._home, self._tools, host, point_ref=point)
            return f"{vm.name} is running point {vm.point} ({vm.accel.upper()}), up in {vm.rto_seconds} s"

        return self._start(FAILOVER, host, user, work)

    def stop_vm(self, host: str, keep: bool, user: str) -> Running:
        def work() -> str:
            vm = failover.stop(self._home, self._tools, host, keep=keep)
            return f"{vm.name} stopped" + (", its writes kept" if keep else ", its writes deleted")

        return self._start(STOP_VM, host, user, work)

    def cutover(self, host: str, user: str) -> None:
        """Ask the running failback to cut over after its pass (it takes effect in that job, not here)."""
        failback.request_cutover(self._home, host)
        log.info("console.cutover_requested", host=host, user=user)

    def _point(self, host: str, point: str) -> None:
        """Check the host and point exist before a job is started for them (a 404, not a failed job)."""
        hosts.load(self._home, host)
        catalog.load(self._home.chain_dir(host), host).find(point)

    def _start(self, kind: str, host: str, user: str, work: Callable[[], str]) -> Running:
        job = Running(kind, host, user, _now())
        with self._lock:
            if host in self._running:
                busy = self._running[host]
                raise ChainLockedError(f"{host} has a {busy.kind} under way (started by {busy.user})")
            self._running[host] = job
        threading.Thread(target=self._run, args=(job, work), name=f"console {kind} {host}", daemon=True).start()
        log.info("console.job_started", kind=kind, host=host, user=user)
        return job

    def _run(self, job: Running, work: Callable[[], str]) -> None:
        t0 = time.monotonic()
        hint = ""
        try:
            message, ok = work(), True
        except ApplianceError as exc:
            message, ok, hint = exc.message, False, exc.hint or ""
        except Exception as exc:  # a bug in one job must not take the console down
            message, ok = f"internal error: {type(exc).__name__}: {exc}", False
            log.exception("console.job_crashed", kind=job.kind, host=job.host)
        seconds = round(time.monotonic() - t0, 2)
        (log.info if ok else log.error)("console.job_finished", kind=job.kind, host=job.host, ok=ok, message=message)
        try:
            journal.append(self._home, journal.Entry(job.kind, job.host, job.started, seconds, ok, message,
                                                     origin="console", user=job.user, hint=hint))  # fmt: skip
        except ApplianceError as exc:
            log.error("job.not_recorded", kind=job.kind, host=job.host, error=exc.message)
        finally:  # after the journal has it: a page never sees the job neither running nor finished
            with self._lock:
                self._running.pop(job.host, None)


def _now() -> datetime:
    return datetime.now(UTC)
