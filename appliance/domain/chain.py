# SPDX-License-Identifier: GPL-2.0-or-later
"""A host's chain of recovery points: base <- p1 <- p2 ..., oldest first.

Every point holds one qcow2 file per disk whose backing file is the same disk's file in the point
before it; a point's depth is its position counted from the base (the base has depth 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from appliance.domain.models import POINT_ID_FORMAT, Point
from appliance.errors import PointNotFoundError


@dataclass(frozen=True, slots=True)
class Chain:
    host: str
    points: tuple[Point, ...] = ()

    @property
    def newest(self) -> Point | None:
        return self.points[-1] if self.points else None

    def depth(self, point: Point) -> int:
        return self.index(point.id) + 1

    def index(self, point_id: str) -> int:
        for i, p in enumerate(self.points):
            if p.id == point_id:
                return i
        raise PointNotFoundError(f"{self.host} has no recovery point {point_id!r}")

    def find(self, ref: str) -> Point:
        """Resolve what a user typed: a point id, its ISO time (2026-11-24T14:00:00Z) or `latest`."""
        if not self.points:
            raise PointNotFoundError(
                f"{self.host} has no recovery points yet", hint=f"run `appliance backup {self.host}`"
            )
        if ref in ("latest", "newest"):
            return self.points[-1]
        for p in self.points:
            if ref in (p.id, p.time_iso):
                return p
        moment = _parse_time(ref)
        if moment is not None:
            for p in self.points:
                if p.created.replace(microsecond=0) == moment:
                    return p
        raise PointNotFoundError(f"{self.host} has no recovery point {ref!r}")

    def previous(self, point: Point) -> Point | None:
        i = self.index(point.id)
        return self.points[i - 1] if i > 0 else None

    def appended(self, point: Point) -> Chain:
        return replace(self, points=(*self.points, point))

    def with_point(self, point: Point) -> Chain:
        """The chain with one point's record replaced (same id), e.g. after a verification."""
        i = self.index(point.id)
        return replace(self, points=(*self.points[:i], point, *self.points[i + 1 :]))

    def referenced_files(self) -> set[str]:
        return {d.file for p in self.points for d in p.disks}

    def ids(self) -> set[str]:
        return {p.id for p in self.points}


def _parse_time(text: str) -> datetime | None:
    for fmt in (POINT_ID_FORMAT, "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S"):
        try:
            moment = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return None
