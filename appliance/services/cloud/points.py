# SPDX-License-Identifier: GPL-2.0-or-later
"""`cloud points`: what the bucket holds, read from the bucket itself (not from this appliance's index), with
each manifest's lock and whether a delete marker hides it: after a disaster, the bucket is what counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.domain.cloud import CloudPoint
from appliance.ports import ObjectLock, Tools
from appliance.services.cloud.bucket import open_point, open_store
from appliance.store.cloud import Index
from appliance.store.layout import Home


@dataclass(frozen=True, slots=True)
class BucketPoint:
    manifest: str
    point: CloudPoint
    lock: ObjectLock | None
    hidden: bool  # a delete marker is over its manifest (someone "deleted" it; the locked version is read)


def points(home: Home, tools: Tools, name: str, host: str | None = None) -> list[BucketPoint]:
    """The bucket's points (of `host`), read from the bucket itself, with each manifest's lock."""
    opened = open_store(home, tools, name)
    out = []
    with Index(home, name) as index:
        cached = {p.manifest: p for p in index.points()}
    for o in opened.bucket.listing("points/"):
        known = cached.get(o.key)
        sealed = (
            known.sealed if known is not None and known.version == o.version else opened.bucket.get(o.key, o.version)
        )
        point = open_point(opened.sealer, o.key, sealed)
        if host is None or point.host == host:
            lock = opened.bucket.lock_of(o.key, o.version) if opened.store.lock_days else None
            out.append(BucketPoint(o.key, point, lock, o.hidden))
    return sorted(out, key=lambda p: (p.point.host, p.point.created, p.point.point))
