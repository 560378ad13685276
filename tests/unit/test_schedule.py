# SPDX-License-Identifier: GPL-2.0-or-later
"""The scheduler's logic with a fake clock: order, intervals, nightly consolidation, failures, stop."""

from __future__ import annotations

import threading
import time as systime
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

from appliance.domain.models import Host, HostKey
from appliance.domain.schedule import ALL_HOSTS, BACKUP, CONSOLIDATE, Job, due_jobs
from appliance.errors import RemoteError
from appliance.services.daemon import Scheduler
from appliance.store import hosts, schedule
from appliance.store.layout import Home

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    systime.tzset()


def test_due_jobs_order_and_times() -> None:
    last = {(BACKUP, "a"): T0 - timedelta(minutes=10)}
    jobs = due_jobs([("a", 900), ("b", 3600), ("c", 0)], last, T0, time(2, 0))
    assert [(j.kind, j.host) for j in jobs] == [(BACKUP, "b"), (BACKUP, "a"), (CONSOLIDATE, ALL_HOSTS)]
    assert jobs[0].due == T0  # never ran: at once
    assert jobs[1].due == T0 + timedelta(minutes=5)
    assert jobs[2].due == datetime(2026, 11, 26, 2, 0, tzinfo=UTC)


def test_consolidation_once_a_day() -> None:
    ran = datetime(2026, 11, 26, 2, 0, 5, tzinfo=UTC)
    jobs = due_jobs([], {(CONSOLIDATE, ALL_HOSTS): ran}, ran + timedelta(minutes=1), time(2, 0))
    assert jobs[0].due == datetime(2026, 11, 27, 2, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.t = start

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        self.t += timedelta(seconds=seconds)


def _host(home: Home, name: str, interval: float) -> None:
    key = HostKey("ssh-ed25519", "AAAA", "SHA256:x")
    hosts.save(home, Host(name, "10.0.0.1", "root", 22, "keys/x", key, ("/dev/sda",), interval=interval))


def test_a_failing_host_never_stops_the_others_and_stop_waits_for_the_job(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    _host(home, "good", 900)
    _host(home, "bad", 600)
    clock = FakeClock(T0)
    stop = threading.Event()
    ran: list[tuple[str, str, datetime]] = []

    def runner(job: Job) -> str:
        ran.append((job.kind, job.host, clock.now()))
        clock.t += timedelta(seconds=30)  # jobs take time
        if job.host == "bad":
            raise RemoteError("cannot reach bad")
        if clock.now() > T0 + timedelta(hours=5):
            stop.set()  # asked to stop during a job: this job still completes
        return "ok"

    Scheduler(home, runner, clock, time(2, 0), stop).run()
    backups = [(h, t) for k, h, t in ran if k == BACKUP]
    goods = [t for h, t in backups if h == "good"]
    bads = [t for h, t in backups if h == "bad"]
    assert len(goods) >= 20 and len(bads) >= 30
    gaps = {(b - a).total_seconds() for a, b in zip(goods, goods[1:], strict=False)}
    assert min(gaps) >= 900 and max(gaps) <= 900 + 60  # at its interval, or just after a job still running
    consolidations = [t for k, _, t in ran if k == CONSOLIDATE]
    assert len(consolidations) == 1 and consolidations[0].hour == 2
    outcomes = schedule.load(home)
    assert outcomes[(BACKUP, "bad")].ok is False and outcomes[(BACKUP, "bad")].message == "cannot reach bad"
    assert outcomes[(BACKUP, "good")].ok is True
    assert ran[-1][2] > T0 + timedelta(hours=5) - timedelta(minutes=20)
