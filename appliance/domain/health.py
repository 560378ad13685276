# SPDX-License-Identifier: GPL-2.0-or-later
"""Whether each host is protected, as the console, the alerts and the metrics all judge it (pure: the
clock and the facts are arguments).

A host is, in this order of precedence:
- `never`: it has no recovery point at all (a new host, or one whose first backup keeps failing);
- `failing`: its last backup failed (the newest point may still be young: it says how stale it gets);
- `late`: its newest point is older than its interval plus a grace (the time a backup takes, within
  limits), so a point is due and has not come;
- `protected`: otherwise. A host without an interval (backed up by hand or replicated from another
  appliance) is never late: nothing says when its next point is due.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

PROTECTED, LATE, FAILING, NEVER = "protected", "late", "failing", "never"
STATES = (PROTECTED, LATE, FAILING, NEVER)
MIN_GRACE = 60.0  # seconds: a point taken a little after its time is not late
TREND_WINDOW_DAYS = 14.0  # the store's growth is judged over this much history


def grace(interval: float, last_backup_seconds: float) -> float:
    """How long after `interval` a point may come before the host counts as late: twice what its last
    backup took (at least a minute), never more than a quarter of the interval (a 20 s interval: 5 s)."""
    return min(interval / 4, max(MIN_GRACE, 2 * last_backup_seconds))


def late_after(interval: float, last_backup_seconds: float) -> float:
    """The age (seconds) of the newest point past which the host is late; 0: never late."""
    return interval + grace(interval, last_backup_seconds) if interval > 0 else 0.0


def classify(
    *, now: datetime, newest: datetime | None, interval: float, last_backup_seconds: float, last_backup_ok: bool | None
) -> str:
    """The host's state (see the module's docstring). `last_backup_ok`: None when no backup ran yet."""
    if newest is None:
        return NEVER
    if last_backup_ok is False:
        return FAILING
    limit = late_after(interval, last_backup_seconds)
    if limit and (now - newest).total_seconds() > limit:
        return LATE
    return PROTECTED


def failures_in_row(outcomes: Sequence[bool]) -> int:
    """How many of the newest outcomes (oldest first) failed, counted back from the newest."""
    count = 0
    for ok in reversed(outcomes):
        if ok:
            break
        count += 1
    return count


@dataclass(frozen=True, slots=True)
class UsageSample:
    time: datetime
    used: int  # bytes used on the file system that holds the store
    total: int


def days_until_full(samples: Sequence[UsageSample]) -> float | None:
    """Days until the store's file system is full at the rate it grew (least squares over the last
    TREND_WINDOW_DAYS of samples, oldest first); None when it does not grow or there is too little history
    (less than an hour, or fewer than three samples)."""
    if len(samples) < 3:
        return None
    newest = samples[-1]
    recent = [s for s in samples if (newest.time - s.time).total_seconds() <= TREND_WINDOW_DAYS * 86400]
    if len(recent) < 3 or (newest.time - recent[0].time).total_seconds() < 3600:
        return None
    xs = [(s.time - recent[0].time).total_seconds() / 86400 for s in recent]
    ys = [float(s.used) for s in recent]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    per_day = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    if per_day <= 0:
        return None
    return max(0.0, (newest.total - newest.used) / per_day)


def usage_percent(used: int, total: int) -> float:
    return 100.0 * used / total if total else 0.0
