# SPDX-License-Identifier: GPL-2.0-or-later
"""Retention as restic's forget: last N, newest per hour/day/week/month bucket, newest always, pins."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pytest

from appliance.domain.models import DiskPoint, Point
from appliance.domain.retention import DEFER, DROP, KEEP, RetentionPolicy, plan
from appliance.errors import ConfigError


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def _points(*moments: datetime) -> list[Point]:
    return [
        Point(m.strftime("%Y%m%dT%H%M%SZ"), m, 1.0, (DiskPoint("disk0", "/dev/sda", "f", 1, 4096, "d"),))
        for m in moments
    ]


def _actions(points: list[Point], policy: RetentionPolicy, pinned: dict[str, str] | None = None) -> list[str]:
    return [d.action for d in plan(points, policy, pinned or {})]


T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)  # a Monday


def test_no_policy_keeps_everything() -> None:
    pts = _points(*(T0 + timedelta(hours=h) for h in range(5)))
    assert _actions(pts, RetentionPolicy()) == [KEEP] * 5


def test_keep_last() -> None:
    pts = _points(*(T0 + timedelta(minutes=15 * i) for i in range(6)))
    assert _actions(pts, RetentionPolicy(last=2)) == [DROP] * 4 + [KEEP] * 2


def test_hourly_keeps_the_newest_point_of_each_of_the_last_hours_with_points() -> None:
    # every 15 minutes for 3 hours: 12 points, 4 per hour except the first hour (08:00..08:45)
    pts = _points(*(T0 + timedelta(minutes=15 * i) for i in range(12)))
    decisions = plan(pts, RetentionPolicy(hourly=2), {})
    kept = [d.point for d in decisions if d.action == KEEP]
    assert kept == [pts[7].id, pts[11].id]  # 09:45 (newest of hour 09) and 10:45 (newest of all)
    assert "hourly 2/2 (2026-11-02 09:00)" in decisions[7].reasons
    assert "newest" in decisions[11].reasons and "hourly 1/2 (2026-11-02 10:00)" in decisions[11].reasons


def test_daily_weekly_monthly_buckets() -> None:
    days = [T0 + timedelta(days=d, hours=h) for d in range(40) for h in (1, 13)]
    pts = _points(*days)
    decisions = plan(pts, RetentionPolicy(daily=3, weekly=2, monthly=2), {})
    kept = {d.point: d.reasons for d in decisions if d.action == KEEP}
    # daily: newest of the last 3 days; weekly: newest of this ISO week and the one before; monthly likewise
    assert len([r for rs in kept.values() for r in rs if r.startswith("daily")]) == 3
    weekly = sorted(p for p, rs in kept.items() if any(r.startswith("weekly") for r in rs))
    assert len(weekly) == 2
    monthly = [p for p, rs in kept.items() if any(r.startswith("monthly") for r in rs)]
    assert len(monthly) == 2 and pts[-1].id in monthly
    november_last = max(p.id for p in pts if p.created.month == 11)
    assert november_last in monthly


def test_the_newest_point_is_always_kept_and_the_oldest_may_go() -> None:
    pts = _points(T0, T0 + timedelta(days=1), T0 + timedelta(days=2))
    assert _actions(pts, RetentionPolicy(daily=1)) == [DROP, DROP, KEEP]


def test_pinned_points_are_kept_and_older_drops_deferred() -> None:
    pts = _points(*(T0 + timedelta(hours=h) for h in range(6)))
    decisions = plan(pts, RetentionPolicy(last=1), {pts[2].id: "failover VM recovery-web1 (running)"})
    assert [d.action for d in decisions] == [DEFER, DEFER, KEEP, DROP, DROP, KEEP]
    assert decisions[2].reasons == ("pinned: failover VM recovery-web1 (running)",)
    assert "older than pinned point" in decisions[0].reasons[0]


def test_a_point_held_for_a_dr_site_is_kept_and_holds_nothing_older() -> None:
    pts = _points(*(T0 + timedelta(hours=h) for h in range(6)))
    decisions = plan(pts, RetentionPolicy(last=1), {}, {pts[2].id: "replication to site dr1"})
    assert [d.action for d in decisions] == [DROP, DROP, KEEP, DROP, DROP, KEEP]
    assert decisions[2].reasons == ("held: replication to site dr1",)


def test_invalid_policy() -> None:
    with pytest.raises(ConfigError):
        RetentionPolicy(last=-1)


def test_local_time_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """23:30 and 00:30 UTC are the same day in New York (UTC-5)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        pts = _points(datetime(2026, 11, 2, 23, 30, tzinfo=UTC), datetime(2026, 11, 3, 0, 30, tzinfo=UTC))
        assert _actions(pts, RetentionPolicy(daily=2)) == [DROP, KEEP]
    finally:
        os.environ["TZ"] = "UTC"
        time.tzset()
