# SPDX-License-Identifier: GPL-2.0-or-later
"""The scheduler's logic with a fake clock: order, intervals, nightly consolidation, clock jumps, jobs side by
side, failures, damaged files, stop."""

from __future__ import annotations

import json
import threading
import time as systime
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from appliance.domain.models import Host, HostKey
from appliance.domain.schedule import BACKUP, CONSOLIDATE, Job, due_jobs, jobs_to_start
from appliance.errors import ConfigError, DamagedFileError, RemoteError
from appliance.services.daemon import Scheduler, upcoming
from appliance.store import hosts, schedule
from appliance.store.layout import Home
from tests.conftest import run_cli

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    systime.tzset()


def test_due_jobs_order_and_times() -> None:
    last = {(BACKUP, "a"): T0 - timedelta(minutes=10), (CONSOLIDATE, "c"): T0 - timedelta(hours=20)}
    jobs = due_jobs([("a", 900), ("b", 3600), ("c", 0)], last, T0, time(2, 0))
    assert [(j.kind, j.host, j.due - T0) for j in jobs] == [
        (BACKUP, "b", timedelta(0)),  # never ran: at once
        (BACKUP, "a", timedelta(minutes=5)),
        (CONSOLIDATE, "a", timedelta(hours=4)),  # every host, scheduled backups or not, at 02:00
        (CONSOLIDATE, "b", timedelta(hours=4)),
        (CONSOLIDATE, "c", timedelta(hours=4)),
    ]


def test_consolidation_once_a_day() -> None:
    ran = datetime(2026, 11, 26, 2, 0, 5, tzinfo=UTC)
    jobs = due_jobs([("a", 0)], {(CONSOLIDATE, "a"): ran}, ran + timedelta(minutes=1), time(2, 0))
    assert jobs[0].due == datetime(2026, 11, 27, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize("ahead", [YEAR, timedelta(hours=3), timedelta(minutes=6)])
def test_a_last_run_later_than_now_is_due_at_once(ahead: timedelta) -> None:
    last = {(BACKUP, "a"): T0 + ahead, (CONSOLIDATE, "a"): T0 + ahead}
    assert [j.due for j in due_jobs([("a", 3600)], last, T0, time(2, 0))] == [T0, T0]


def test_a_last_run_a_few_seconds_later_than_now_keeps_its_pace() -> None:
    """An NTP step back just after a job does not run it twice."""
    ran = T0 + timedelta(seconds=3)
    jobs = due_jobs([("a", 3600)], {(BACKUP, "a"): ran, (CONSOLIDATE, "a"): ran}, T0, time(2, 0))
    assert [j.due for j in jobs] == [ran + timedelta(hours=1), datetime(2026, 11, 26, 2, 0, tzinfo=UTC)]


def test_a_clock_set_forward_runs_each_job_once_then_keeps_its_pace() -> None:
    now = T0 + timedelta(days=3)
    jobs = due_jobs([("a", 3600)], {(BACKUP, "a"): T0, (CONSOLIDATE, "a"): T0}, now, time(2, 0))
    assert [j.due <= now for j in jobs] == [True, True]  # due once each, not once per missed run
    after = due_jobs([("a", 3600)], {(BACKUP, "a"): now, (CONSOLIDATE, "a"): now}, now, time(2, 0))
    assert [j.due - now for j in after] == [timedelta(hours=1), timedelta(hours=4)]


def test_jobs_start_in_due_order_one_per_host_within_the_slots() -> None:
    now = T0.replace(hour=2)  # every backup and every consolidation is due
    jobs = due_jobs([("a", 60), ("b", 60), ("c", 60), ("d", 60)], {}, now, time(2, 0))
    start, _ = jobs_to_start(jobs, now, busy={"b"}, slots=2)
    assert [j.key for j in start] == [(BACKUP, "a"), (BACKUP, "c")]  # b is busy; never a's two jobs at once
    start, next_due = jobs_to_start(jobs, now, busy={"a", "b", "c"}, slots=4)
    assert [j.key for j in start] == [(BACKUP, "d")] and next_due is None
    later = [Job(BACKUP, "a", now + timedelta(minutes=1)), Job(BACKUP, "b", now + timedelta(minutes=2))]
    assert jobs_to_start(later, now, busy={"a"}, slots=1) == ([], now + timedelta(minutes=2))


class FakeClock:
    """Virtual time that passes only while the scheduler sleeps and no job that can end is running: a job's
    end is an event of the test (instant, or when the test releases it), never a real duration."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self.busy: Callable[[], bool] = lambda: False

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        while not wake.is_set() and self.busy():
            wake.wait(0.001)
        if not wake.is_set():
            self.t += timedelta(seconds=seconds)


def _host(home: Home, name: str, interval: float) -> None:
    key = HostKey("ssh-ed25519", "AAAA", "SHA256:x")
    hosts.save(home, Host(name, "10.0.0.1", "root", 22, "keys/x", key, ("/dev/sda",), interval=interval))


def _scheduler(home: Home, runner: Callable[[Job], str], clock: FakeClock, jobs: int = 2,
               hung: frozenset[str] = frozenset()) -> Scheduler:  # fmt: skip
    sched = Scheduler(home, runner, clock, time(2, 0), jobs=jobs)
    clock.busy = lambda: bool(set(sched.running) - hung)
    return sched


def test_a_clock_a_year_ahead_and_back_postpones_nothing(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    _host(home, "web", 3600)
    clock = FakeClock(T0)  # 22:00
    ran: list[tuple[str, datetime]] = []

    def runner(job: Job) -> str:
        ran.append((job.kind, clock.now()))
        if len(ran) == 1:
            clock.t = T0 + YEAR  # set a year ahead while the first backup runs
        elif job.kind == CONSOLIDATE and clock.now() >= T0 + YEAR:
            clock.t = T0 + timedelta(minutes=30)  # and back, after a backup and a consolidation ran there
        elif T0 + timedelta(hours=6) < clock.now() < T0 + YEAR:
            sched.request_stop()
        return "ok"

    sched = _scheduler(home, runner, clock)
    sched.run()
    backups = [t - T0 for k, t in ran if k == BACKUP]
    assert backups == [timedelta(0), YEAR] + [timedelta(minutes=30 + 60 * i) for i in range(7)]
    consolidations = [t - T0 for k, t in ran if k == CONSOLIDATE]
    assert consolidations == [YEAR, timedelta(minutes=30), timedelta(hours=4)]  # the last at 02:00 again


def test_a_daemon_started_a_year_ahead_consolidates_at_the_next_night_once_the_clock_is_back(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    _host(home, "web", 3600)
    clock = FakeClock(T0 + YEAR)
    ran: list[tuple[str, datetime]] = []

    def runner(job: Job) -> str:
        ran.append((job.kind, clock.now()))
        if len(ran) == 1:
            clock.t = T0  # set right while the first backup runs
        if job.kind == CONSOLIDATE:
            sched.request_stop()
        return "ok"

    sched = _scheduler(home, runner, clock)
    sched.run()
    assert [(k, t - T0) for k, t in ran][1:] == [(BACKUP, timedelta(hours=h)) for h in range(5)] + [
        (CONSOLIDATE, timedelta(hours=4))  # 02:00, the first night after the clock came back
    ]


def test_a_hung_host_delays_no_other_host_and_stop_waits_for_it(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    _host(home, "good", 900)
    _host(home, "hung", 600)
    clock = FakeClock(T0)
    release = threading.Event()
    ran: list[tuple[str, str, datetime]] = []

    def runner(job: Job) -> str:
        ran.append((job.kind, job.host, clock.now()))
        if job.host == "hung":
            release.wait()  # until the test lets it go: its backups and consolidation keep falling due meanwhile
        elif clock.now() >= T0 + timedelta(hours=5):
            sched.request_stop()
        return "ok"

    sched = _scheduler(home, runner, clock, hung=frozenset({"hung"}))
    daemon = threading.Thread(target=sched.run)
    daemon.start()
    assert sched.stop.wait(30)
    daemon.join(0.5)
    assert daemon.is_alive() and "hung" in sched.running  # starts no more jobs, waits for the running one
    release.set()
    daemon.join(30)
    assert not daemon.is_alive() and sched.running == []
    goods = [t for k, h, t in ran if h == "good" and k == BACKUP]
    assert goods == [T0 + timedelta(minutes=15 * i) for i in range(21)]  # at its interval, never late
    assert [(k, h) for k, h, _ in ran if h == "hung"] == [(BACKUP, "hung")]  # never two jobs of one host
    assert [(h, t.hour) for k, h, t in ran if k == CONSOLIDATE] == [("good", 2)]
    assert schedule.load(home)[(BACKUP, "hung")].ok is True  # its end was recorded before the daemon stopped


def test_a_failing_or_crashing_host_never_stops_the_others(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    for name, interval in (("good", 900), ("bad", 600), ("buggy", 1200)):
        _host(home, name, interval)
    clock = FakeClock(T0)
    ran: list[tuple[str, str, datetime]] = []

    def runner(job: Job) -> str:
        ran.append((job.kind, job.host, clock.now()))
        if job.host == "bad":
            raise RemoteError("cannot reach bad")
        if job.host == "buggy":
            raise KeyError("a bug")
        if clock.now() >= T0 + timedelta(hours=5):
            sched.request_stop()
        return "ok"

    sched = _scheduler(home, runner, clock, jobs=1)
    sched.run()
    for name, interval, count in (("good", 900, 21), ("bad", 600, 30), ("buggy", 1200, 15)):
        times = [t for k, h, t in ran if h == name and k == BACKUP]
        assert times[:count] == [T0 + timedelta(seconds=interval * i) for i in range(count)]
    assert sorted(h for k, h, _ in ran if k == CONSOLIDATE) == ["bad", "buggy", "good"]
    outcomes = schedule.load(home)
    assert outcomes[(BACKUP, "bad")].ok is False and outcomes[(BACKUP, "bad")].message == "cannot reach bad"
    assert outcomes[(BACKUP, "buggy")].message == "internal error: KeyError: 'a bug'"
    assert outcomes[(BACKUP, "good")].ok is True and outcomes[(CONSOLIDATE, "good")].ok is True


@pytest.mark.parametrize("damage", ["garbage{", "[]", '{"name": "web", "interval": "15m"}', "interval"])
def test_a_damaged_host_record_is_logged_once_and_the_others_keep_their_schedule(tmp_path: Path,
                                                                                 damage: str) -> None:  # fmt: skip
    home = Home(tmp_path).ensure()
    _host(home, "good", 900)
    _host(home, "web", 900)
    record = home.host_record("web")
    if damage == "interval":  # a wrong type in one field of an otherwise good record
        record.write_text(json.dumps({**json.loads(record.read_text()), "interval": "15m"}))
    else:
        record.write_text(damage)
    with pytest.raises(DamagedFileError, match=f"{record} is damaged"):
        hosts.load(home, "web")
    clock = FakeClock(T0)
    ran, logs = _run_for_an_hour(home, clock)
    assert ran == ["good"] * 5
    unreadable = [e for e in logs if e["event"] == "daemon.host_unreadable"]
    assert len(unreadable) == 1 and unreadable[0]["file"] == str(record)
    plan = upcoming(home, schedule.load(home), clock.now(), time(2, 0))
    assert list(plan.unreadable) == ["web"] and str(record) in plan.unreadable["web"]
    assert {j.host for j in plan.jobs} == {"good"}


def _run_for_an_hour(home: Home, clock: FakeClock) -> tuple[list[str], list[dict[str, Any]]]:
    """Run the scheduler with jobs that succeed until the fake clock is an hour on: the hosts of the jobs
    it ran, in order, and what it logged."""
    ran: list[str] = []

    def runner(job: Job) -> str:
        ran.append(job.host)
        if clock.now() >= T0 + timedelta(hours=1):
            sched.request_stop()
        return "ok"

    sched = _scheduler(home, runner, clock)
    with capture_logs() as logs:
        sched.run()
    return ran, logs


@pytest.mark.parametrize("damage", ["garbage{", "{}", '[{"kind": "backup"}]', "[[]]"])
def test_a_damaged_history_names_its_file_and_the_daemon_starts_a_new_one(tmp_path: Path, damage: str) -> None:
    home = Home(tmp_path).ensure()
    _host(home, "web", 900)
    history = home.root / schedule.NAME
    history.write_text(damage)
    with pytest.raises(DamagedFileError, match=f"{history} is damaged"):
        schedule.load(home)
    clock = FakeClock(T0)
    _, logs = _run_for_an_hour(home, clock)
    assert [e["event"] for e in logs if "history" in e["event"]] == ["daemon.history_unreadable",
                                                                     "daemon.history_readable"]  # fmt: skip
    assert schedule.load(home)[(BACKUP, "web")].started == T0 + timedelta(hours=1)
    assert history.with_name("schedule.json.damaged").read_text() == damage


def test_schedule_shows_an_unreadable_host_and_a_last_run_later_than_now(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    _host(home, "web", 900)
    home.host_record("db").write_text("[]")
    now = datetime.now(UTC)
    schedule.record(home, schedule.Outcome(BACKUP, "web", now + YEAR, 1.0, True, "point x"))
    shown = run_cli(tmp_path, "schedule")
    assert shown.rc == DamagedFileError.exit_code, shown.err  # the listing, then the damaged record named
    assert shown.error_lines[0] == f"error: {home.host_record('db')} is damaged: it holds an array, not an object"
    rows = {tuple(line.split()[:2]): line for line in shown.out.splitlines()[1:]}
    assert f"UNREADABLE: {home.host_record('db')} is damaged" in rows[("-", "db")]
    assert "(later than now: the clock was changed) ok: point x" in rows[(BACKUP, "web")]
    due = datetime.fromisoformat(" ".join(rows[(BACKUP, "web")].split()[2:4])).replace(tzinfo=UTC)
    assert due - now < timedelta(minutes=1)  # due at once, not a year from now
    (home.root / schedule.NAME).write_text("[]]")
    shown = run_cli(tmp_path, "schedule")
    assert shown.rc == DamagedFileError.exit_code and f"{home.root / schedule.NAME} is damaged" in shown.err
    assert len(shown.err.strip().splitlines()) <= 2 and "Traceback" not in shown.err  # the line and its hint


# -- replication: at a site's interval, inside its window ---------------------------------------------------


def test_a_window_across_midnight_is_open_at_night_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.domain.schedule import parse_window

    monkeypatch.setenv("TZ", "UTC")
    systime.tzset()
    window = parse_window("19:00-07:00")
    assert window is not None and str(window) == "19:00-07:00"
    day = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert not window.is_open(day) and window.next_open(day) == datetime(2026, 11, 26, 19, 0, tzinfo=UTC)
    assert window.is_open(datetime(2026, 11, 26, 23, 0, tzinfo=UTC))
    assert window.is_open(datetime(2026, 11, 27, 6, 59, tzinfo=UTC))
    assert not window.is_open(datetime(2026, 11, 27, 7, 0, tzinfo=UTC))
    assert parse_window("") is None
    for bad in ("19:00", "25:00-07:00", "07:00-07:00"):
        with pytest.raises(ConfigError):
            parse_window(bad)


def test_a_site_is_replicated_at_its_interval_but_only_inside_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.domain.schedule import REPLICATE, parse_window

    monkeypatch.setenv("TZ", "UTC")
    systime.tzset()
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    sites = [("hq", 900.0, parse_window("19:00-07:00")), ("branch", 900.0, None), ("off", 0.0, None)]
    last = {(REPLICATE, "branch"): now - timedelta(minutes=5)}
    jobs = [j for j in due_jobs([], last, now, time(2, 0), replications=sites) if j.kind == REPLICATE]
    assert [(j.host, j.due) for j in jobs] == [
        ("branch", now + timedelta(minutes=10)),
        ("hq", datetime(2026, 11, 26, 19, 0, tzinfo=UTC)),
    ]


def test_a_cloud_store_with_an_interval_is_pushed_to_inside_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.domain.schedule import PUSH, parse_window

    monkeypatch.setenv("TZ", "UTC")
    systime.tzset()
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    stores = [("b2", 3600.0, parse_window("19:00-07:00")), ("after-each-point", 0.0, None)]
    jobs = [j for j in due_jobs([], {}, now, time(2, 0), pushes=stores) if j.kind == PUSH]
    assert [(j.host, j.due) for j in jobs] == [("b2", datetime(2026, 11, 26, 19, 0, tzinfo=UTC))]


def test_uploads_are_paced_to_the_bandwidth_limit() -> None:
    from appliance.services.pipeline import Pace

    clock = [0.0]
    slept: list[float] = []
    pace = Pace(1000, clock=lambda: clock[0], sleep=lambda s: (slept.append(s), clock.__setitem__(0, clock[0] + s)))
    for _ in range(4):
        pace(2000)
    assert clock[0] == pytest.approx(6.0)  # 8000 bytes at 1000/s: the last put starts at 6 s and takes 2 s
    assert Pace(0)(10**9) is None  # no limit: no wait


def test_a_throttled_receive_takes_no_more_than_its_rate() -> None:
    from appliance.services.replicate import Throttle

    clock = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    throttle = Throttle(lambda: b"x" * 1000, 10_000, clock=lambda: clock[0], sleep=sleep)
    for _ in range(20):
        throttle()
    assert throttle.received == 20_000 and abs(clock[0] - 1.9) < 1e-9  # the 20th kB starts at 1.9 s


def test_a_new_point_goes_to_each_store_pushed_to_after_each_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.errors import ChainLockedError
    from appliance.services import daemon
    from appliance.services.cloud.push import PushReport
    from appliance.store import cloud as cloud_records
    from appliance.store.layout import Home

    home = Home(tmp_path).ensure()
    for name, interval, window in (("b2", 0.0, ""), ("nightly", 3600.0, ""), ("closed", 0.0, "03:00-03:01")):
        cloud_records.save(home, cloud_records.CloudStore(name=name, store_id="s", endpoint="e", bucket="b",
                                                          region="r", interval=interval, window=window))  # fmt: skip
    calls: list[tuple[str, str | None]] = []

    def fake_push(home: Home, tools: Any, name: str, only: str | None = None, **_: Any) -> list[PushReport]:
        calls.append((name, only))
        if name == "closed":
            raise ChainLockedError("busy")
        return [PushReport(str(only), "p1")]

    monkeypatch.setattr(daemon, "push", fake_push)
    at = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert daemon._pushed_after(home, None, "web1", now=at) == ", pushed to b2"  # type: ignore[arg-type]
    assert calls == [("b2", "web1")]
    inside = datetime(2026, 11, 26, 3, 0, 30, tzinfo=UTC)
    monkeypatch.setenv("TZ", "UTC")
    systime.tzset()
    said = daemon._pushed_after(home, None, "web1", now=inside)  # type: ignore[arg-type]
    assert "push to closed FAILED (busy)" in said and "pushed to b2" in said
