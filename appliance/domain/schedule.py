# SPDX-License-Identifier: GPL-2.0-or-later
"""When jobs are due (pure: the clock is an argument).

Each host with an interval gets a backup that interval after its last attempt (at once if it never
ran; a failed attempt counts, so a broken host is retried at its own pace and never starves the
others). Consolidation of every host runs once a day at a set local time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from appliance.errors import ConfigError

BACKUP, CONSOLIDATE = "backup", "consolidate"
ALL_HOSTS = "*"


@dataclass(frozen=True, slots=True)
class Job:
    kind: str
    host: str  # ALL_HOSTS for consolidation
    due: datetime

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.host)


def parse_time_of_day(text: str) -> time:
    try:
        hours, minutes = (int(x) for x in text.split(":"))
        return time(hours, minutes)
    except ValueError:
        raise ConfigError(f"invalid time of day {text!r}: use HH:MM, e.g. 02:00") from None


def due_jobs(
    intervals: Sequence[tuple[str, float]], last_runs: Mapping[tuple[str, str], datetime], now: datetime,
    consolidate_at: time, since: datetime | None = None,
) -> list[Job]:  # fmt: skip
    """Every scheduled job with the time it is due, soonest first (ties: backups before consolidation).

    `since` is when the scheduler started: a consolidation that never ran is due at the first `consolidate_at`
    after it, so a job still running at that moment delays it instead of skipping a day."""
    jobs = []
    for host, interval in intervals:
        if interval > 0:
            last = last_runs.get((BACKUP, host))
            jobs.append(Job(BACKUP, host, now if last is None else last + timedelta(seconds=interval)))
    last = last_runs.get((CONSOLIDATE, ALL_HOSTS))
    jobs.append(Job(CONSOLIDATE, ALL_HOSTS, _next_daily(consolidate_at, last or since or now, inclusive=last is None)))
    return sorted(jobs, key=lambda j: (j.due, j.kind != BACKUP, j.host))


def _next_daily(at: time, after: datetime, *, inclusive: bool) -> datetime:
    """The first moment at local time `at` after `after` (or at `after` itself if `inclusive`)."""
    local = after.astimezone()
    candidate = local.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    if candidate < local or (candidate == local and not inclusive):
        candidate += timedelta(days=1)
    return candidate
