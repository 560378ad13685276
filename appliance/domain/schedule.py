# SPDX-License-Identifier: GPL-2.0-or-later
"""When jobs are due, and which of them to start (pure: the clock is an argument).

Each host with an interval gets a backup that interval after its last attempt (at once if it never
ran; a failed attempt counts, so a broken host is retried at its own pace and never starves the
others). Each host's consolidation runs once a day at a set local time.

The wall clock can jump, and the history holds wall-clock times. A last run later than now (the clock
was ahead when the job ran and has been set right since, or was set back) says nothing about how long
ago the job really ran, so the job is due at once: a clock that spent a while a year ahead costs one
early run, never a year without backups. A clock set forward makes every job overdue: each runs once,
then keeps its pace from the new time (no catching up on the runs "missed").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from appliance.errors import ConfigError

BACKUP, CONSOLIDATE, REPLICATE, PUSH = "backup", "consolidate", "replicate", "push"

# A last run at most this far in the future is taken as it is: an NTP step of a few seconds back right
# after a backup must not start the same backup again at once (it would read the whole disk for nothing).
CLOCK_SLACK = timedelta(minutes=5)
# Where an absurd interval (a hand-edited record) puts the next run instead of overflowing datetime.
_FAR = datetime(9000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Job:
    kind: str
    host: str
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


@dataclass(frozen=True, slots=True)
class Window:
    """Local times of day between which something may start (`start` > `end`: across midnight)."""

    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def is_open(self, moment: datetime) -> bool:
        now = moment.astimezone().time().replace(second=0, microsecond=0)
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def next_open(self, moment: datetime) -> datetime:
        """`moment` itself if the window is open then, else when it next opens."""
        if self.is_open(moment):
            return moment
        return _next_daily(self.start, moment, inclusive=True)


def parse_window(text: str) -> Window | None:
    """'19:00-07:00' -> a Window; '' -> None (any time). :raises ConfigError:"""
    if not text:
        return None
    start, sep, end = text.partition("-")
    if not sep:
        raise ConfigError(f"invalid window {text!r}: use HH:MM-HH:MM, e.g. 19:00-07:00")
    window = Window(parse_time_of_day(start), parse_time_of_day(end))
    if window.start == window.end:
        raise ConfigError(f"invalid window {text!r}: it opens and closes at the same time")
    return window


def ran_in_the_future(started: datetime, now: datetime) -> bool:
    """Whether a recorded run is later than now by more than the slack: the clock was changed since."""
    return started > now + CLOCK_SLACK


def due_jobs(
    intervals: Sequence[tuple[str, float]], last_runs: Mapping[tuple[str, str], datetime], now: datetime,
    consolidate_at: time, first_seen: Mapping[str, datetime] | None = None,
    replications: Sequence[tuple[str, float, Window | None]] = (),
    pushes: Sequence[tuple[str, float, Window | None]] = (),
) -> list[Job]:  # fmt: skip
    """Every scheduled job with the time it is due, soonest first (ties: backups first, then by host).

    `first_seen` is when the scheduler first saw each host (never later than now: the scheduler moves it
    back when the clock goes back): a consolidation that never ran is due at the first `consolidate_at`
    after it, so a job still running at that moment delays it instead of skipping a day. Without it that
    is the first `consolidate_at` from now."""
    jobs = []
    for host, interval in intervals:
        if interval > 0:
            jobs.append(Job(BACKUP, host, _backup_due(last_runs.get((BACKUP, host)), interval, now)))
        last, seen = last_runs.get((CONSOLIDATE, host)), (first_seen or {}).get(host, now)
        jobs.append(Job(CONSOLIDATE, host, _consolidation_due(last, consolidate_at, seen, now)))
    for kind, timed in ((REPLICATE, replications), (PUSH, pushes)):  # a site's replication, a cloud store's push:
        for name, interval, window in timed:  # at its interval, inside its window
            if interval > 0:
                due = _backup_due(last_runs.get((kind, name)), interval, now)
                jobs.append(Job(kind, name, window.next_open(due) if window and due < _FAR else due))
    return sorted(jobs, key=lambda j: (j.due, j.kind != BACKUP, j.host))


def jobs_to_start(
    jobs: Sequence[Job], now: datetime, busy: Collection[str], slots: int
) -> tuple[list[Job], datetime | None]:
    """The due jobs to start now, and when the next job of an idle host falls due (None: none is waiting).

    Soonest first; never a job for a host that is running one (nor two for one host), so one host's jobs
    never overlap; at most `slots` of them. A due job left waiting for a slot or for its host starts when
    a running job ends, so the caller sleeps until the returned time or until a job ends."""
    start: list[Job] = []
    taken = set(busy)
    for job in jobs:
        if job.host in taken:
            continue
        if job.due > now:
            return start, job.due
        if len(start) < slots:
            start.append(job)
            taken.add(job.host)
    return start, None


def _backup_due(last: datetime | None, interval: float, now: datetime) -> datetime:
    if last is None or ran_in_the_future(last, now):
        return now
    try:
        return min(last + timedelta(seconds=interval), _FAR)
    except OverflowError:
        return _FAR


def _consolidation_due(last: datetime | None, at: time, first_seen: datetime, now: datetime) -> datetime:
    if last is None:
        return _next_daily(at, first_seen, inclusive=True)
    if ran_in_the_future(last, now):
        return now
    return _next_daily(at, last, inclusive=False)


def _next_daily(at: time, after: datetime, *, inclusive: bool) -> datetime:
    """The first moment at local time `at` after `after` (or at `after` itself if `inclusive`)."""
    local = after.astimezone()
    candidate = local.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    if candidate < local or (candidate == local and not inclusive):
        candidate += timedelta(days=1)
    return candidate
