# SPDX-License-Identifier: GPL-2.0-or-later
"""How a host's protection is judged (domain.health) and the job journal it is judged from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.domain import health
from appliance.store import journal
from appliance.store.layout import Home

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _state(age: float, interval: float = 900, took: float = 30, ok: bool | None = True) -> str:
    newest = T0 - timedelta(seconds=age)
    return health.classify(now=T0, newest=newest, interval=interval, last_backup_seconds=took, last_backup_ok=ok)


def test_a_host_is_late_once_its_interval_and_grace_have_passed() -> None:
    assert health.grace(900, 30) == 60  # twice the backup's time, at least a minute
    assert health.grace(900, 300) == 225  # at most a quarter of the interval
    assert health.grace(20, 1) == 5
    assert [_state(age) for age in (900, 960, 961)] == ["protected", "protected", "late"]
    assert _state(10**6, interval=0) == "protected"  # no interval: never late
    assert health.late_after(0, 30) == 0


def test_never_failing_and_their_precedence() -> None:
    assert health.classify(now=T0, newest=None, interval=900, last_backup_seconds=0, last_backup_ok=False) == "never"
    assert _state(10, ok=False) == "failing"  # a young point, but the last backup failed
    assert _state(10**5, ok=False) == "failing"
    assert health.failures_in_row([True, False, False]) == 2 and health.failures_in_row([False, True]) == 0


def test_days_until_full_from_the_store_s_growth() -> None:
    day = timedelta(days=1)
    growing = [health.UsageSample(T0 + i * day, 100 + 10 * i, 1000) for i in range(5)]  # 10 a day, 860 left
    assert round(health.days_until_full(growing) or 0, 1) == 86.0
    flat = [health.UsageSample(T0 + i * day, 100, 1000) for i in range(5)]
    assert health.days_until_full(flat) is None
    assert health.days_until_full(growing[:2]) is None  # too little history
    minutes = [health.UsageSample(T0 + timedelta(minutes=i), 100 + i, 1000) for i in range(5)]
    assert health.days_until_full(minutes) is None  # less than an hour of it


def test_the_journal_keeps_every_job_and_counts_them_for_ever(tmp_path: Path) -> None:
    home = Home(tmp_path)
    for i in range(5):
        host, hint = "web1" if i % 2 else "db1", "check it" if i == 3 else ""
        journal.append(
            home, journal.Entry("backup", host, T0 + timedelta(minutes=i), 1.5, i != 3, f"run {i}", hint=hint)
        )
    (tmp_path / journal.NAME).open("ab").write(b'{"half a line\n')  # a crash mid-append
    assert [e.message for e in journal.load(home, host="web1")] == ["run 1", "run 3"]
    assert journal.load(home, host="web1")[-1].hint == "check it"
    assert journal.totals(home) == {"backup": {"ok": 4, "failed": 1}}
    assert oct((tmp_path / journal.NAME).stat().st_mode & 0o777) == "0o600"


def test_the_journal_is_cut_but_its_counts_are_not(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(journal, "KEEP", 3)
    home = Home(tmp_path)
    for i in range(40):
        journal.append(home, journal.Entry("backup", "web1", T0 + timedelta(minutes=i), 1.0, True, "x" * 200))
    assert 3 <= len(journal.load(home)) <= 6
    assert journal.totals(home) == {"backup": {"ok": 40}}


def test_merged_points_are_remembered_per_host(tmp_path: Path) -> None:
    home = Home(tmp_path)
    journal.remember_merged(home, journal.Merged("web1", "p1", T0, "p2", T0 + timedelta(days=1)))
    journal.remember_merged(home, journal.Merged("db1", "q1", T0, "q2", T0 + timedelta(days=1)))
    assert [(m.point, m.into) for m in journal.merged(home, "web1")] == [("p1", "p2")]
