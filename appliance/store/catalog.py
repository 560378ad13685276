# SPDX-License-Identifier: GPL-2.0-or-later
"""A host's chain catalog, `chain.json`: the single record of which points exist.

A point's files are written and renamed into place before the catalog lists it, and the catalog is
replaced atomically, so a reader sees the chain before or after a point, never half of one.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.domain.chain import Chain
from appliance.domain.models import DiskPoint, Point, Verification
from appliance.errors import ChainCorruptError
from appliance.store.files import read_json, write_json

FORMAT = 1
NAME = "chain.json"


def load(chain_dir: Path, host: str) -> Chain:
    path = chain_dir / NAME
    if not path.exists():
        return Chain(host=host)
    try:
        doc = read_json(path)
        if doc.get("format") != FORMAT:
            raise ChainCorruptError(f"{path} has format {doc.get('format')!r}; this appliance reads format {FORMAT}")
        return Chain(host=host, points=tuple(_point(p) for p in doc["points"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ChainCorruptError(f"the catalog {path} is unreadable: {exc}") from exc


def save(chain_dir: Path, chain: Chain) -> None:
    write_json(chain_dir / NAME, {"format": FORMAT, "host": chain.host, "points": [point_doc(p) for p in chain.points]})


def point_doc(p: Point) -> dict[str, Any]:
    """A point as JSON: the catalog's own record, also the base of `points --json`."""
    return {
        "id": p.id,
        "created": p.created.isoformat(),
        "seconds": round(p.seconds, 3),
        "wire_bytes": p.wire_bytes,
        "disks": [
            {
                "slot": d.slot,
                "source": d.source,
                "file": d.file,
                "size": d.size,
                "block_size": d.block_size,
                "digest": d.digest,
                "read_bytes": d.read_bytes,
                "changed_bytes": d.changed_bytes,
                "sent_bytes": d.sent_bytes,
            }
            for d in p.disks
        ],
        "verification": None
        if p.verification is None
        else {
            "time": p.verification.time.isoformat(),
            "ok": p.verification.ok,
            "detail": p.verification.detail,
        },
        "extra": p.extra,
        "dropping": p.dropping,
    }


def _point(doc: dict[str, Any]) -> Point:
    v = doc.get("verification")
    return Point(
        id=doc["id"],
        created=datetime.fromisoformat(doc["created"]),
        seconds=float(doc["seconds"]),
        wire_bytes=int(doc.get("wire_bytes", 0)),
        disks=tuple(
            DiskPoint(
                slot=d["slot"],
                source=d["source"],
                file=d["file"],
                size=int(d["size"]),
                block_size=int(d["block_size"]),
                digest=d["digest"],
                read_bytes=int(d.get("read_bytes", 0)),
                changed_bytes=int(d.get("changed_bytes", 0)),
                sent_bytes=int(d.get("sent_bytes", 0)),
            )
            for d in doc["disks"]
        ),
        verification=None
        if v is None
        else Verification(datetime.fromisoformat(v["time"]), bool(v["ok"]), v.get("detail", "")),
        extra=dict(doc.get("extra") or {}),
        dropping=bool(doc.get("dropping", False)),
    )
