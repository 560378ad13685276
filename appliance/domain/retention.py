# SPDX-License-Identifier: GPL-2.0-or-later
"""Retention: which recovery points a policy keeps, and why (pure; no I/O).

The semantics are restic's `forget` (and close to sanoid's): walking from the newest point back,
`last N` keeps the N newest points; `hourly H` keeps the newest point of each of the H most recent
hours that have a point; likewise `daily`, `weekly` (ISO weeks) and `monthly`. A point kept by any
rule is kept, and every rule that keeps it is named. The newest point is always kept. A point a
recovery VM or a verification depends on (pinned) is never dropped; dropping a point older than a
pinned one would rewrite files in that VM's backing chain, so such a drop is deferred and reported.
Buckets are in the appliance's local time, as users read "daily".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from appliance.domain.models import Point
from appliance.errors import ConfigError

KEEP, DROP, DEFER = "keep", "drop", "defer"

_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {  # point time -> its bucket, per rule
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
}


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def __post_init__(self) -> None:
        for name, value in self.counts().items():
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"invalid retention --keep-{name} {value!r}: a count of 0 or more")

    def counts(self) -> dict[str, int]:
        return {"last": self.last, "hourly": self.hourly, "daily": self.daily, "weekly": self.weekly,
                "monthly": self.monthly}  # fmt: skip

    @property
    def empty(self) -> bool:
        """No rule at all: nothing is ever dropped (a policy must be asked for)."""
        return not any(self.counts().values())

    def __str__(self) -> str:
        return " ".join(f"--keep-{k} {v}" for k, v in self.counts().items() if v) or "keep everything"


@dataclass(frozen=True, slots=True)
class Decision:
    point: str
    action: str  # keep | drop | defer
    reasons: tuple[str, ...]


def plan(
    points: Sequence[Point], policy: RetentionPolicy, pinned: Mapping[str, str], held: Mapping[str, str] | None = None
) -> list[Decision]:
    """One decision per point, oldest first. A `held` point is kept itself (a DR site needs its content),
    but unlike a pinned one it holds nothing older: merging an older point into it changes its file,
    never its content."""
    if policy.empty:
        return [Decision(p.id, KEEP, ("no retention policy",)) for p in points]
    reasons: dict[str, list[str]] = {p.id: [] for p in points}
    newest_first = list(reversed(points))
    if newest_first:
        reasons[newest_first[0].id].append("newest")
    for i, p in enumerate(newest_first[: policy.last]):
        reasons[p.id].append(f"last {i + 1}/{policy.last}")
    for rule, bucket_of in _BUCKETS.items():
        _keep_per_bucket(newest_first, rule, getattr(policy, rule), bucket_of, reasons)
    for pid, why in pinned.items():
        if pid in reasons:
            reasons[pid].append(f"pinned: {why}")
    for pid, why in (held or {}).items():
        if pid in reasons:
            reasons[pid].append(f"held: {why}")
    oldest_pin = max((i for i, p in enumerate(points) if p.id in pinned), default=-1)
    decisions = []
    for i, p in enumerate(points):
        if reasons[p.id]:
            decisions.append(Decision(p.id, KEEP, tuple(reasons[p.id])))
        elif i < oldest_pin:
            decisions.append(Decision(p.id, DEFER, (f"older than pinned point {points[oldest_pin].id}",)))
        else:
            decisions.append(Decision(p.id, DROP, ("no rule keeps it",)))
    return decisions


Bucket = Callable[[datetime], tuple[int, ...]]


def _keep_per_bucket(
    newest_first: Sequence[Point], rule: str, count: int, bucket_of: Bucket, reasons: dict[str, list[str]]
) -> None:
    last_bucket: tuple[int, ...] | None = None
    kept = 0
    for p in newest_first:
        if kept >= count:
            return
        bucket = bucket_of(p.created.astimezone())
        if bucket != last_bucket:
            kept += 1
            last_bucket = bucket
            reasons[p.id].append(f"{rule} {kept}/{count} ({_label(rule, p.created.astimezone())})")


def _label(rule: str, t: datetime) -> str:
    return {
        "hourly": t.strftime("%Y-%m-%d %H:00"),
        "daily": t.strftime("%Y-%m-%d"),
        "weekly": f"week {t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}",
        "monthly": t.strftime("%Y-%m"),
    }[rule]
