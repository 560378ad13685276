# SPDX-License-Identifier: GPL-2.0-or-later
"""A host's chain catalog, `chain.json`: the single record of which points exist.

A point's files are written and renamed into place before the catalog lists it, and the catalog is
replaced atomically, so a reader sees the chain before or after a point, never half of one.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.domain.chain import Chain
from appliance.domain.models import Point
from appliance.errors import DamagedFileError
from appliance.store.files import as_type, damaged, decode_json, write_json
from appliance.store.layout import point_file

FORMAT = 1
NAME = "chain.json"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]*$")  # a point id or a disk slot: never a path


@dataclass(frozen=True, slots=True)
class _Catalog:
    format: int
    points: tuple[Point, ...]


# Catalogs already read, by their content's digest: the console and the metrics read every host's catalog
# at each refresh, and a thousand points take ~50 ms to check field by field, a hundredth of that to hash.
_read: dict[Path, tuple[bytes, Chain]] = {}
_read_lock = threading.Lock()
_READ_KEEP = 1024


def load(chain_dir: Path, host: str) -> Chain:
    """The host's chain as its catalog lists it (empty if there is none yet).

    :raises DamagedFileError: the catalog does not read as one this appliance wrote; the message names it.
    """
    path = chain_dir / NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Chain(host=host)
    except OSError as exc:
        raise DamagedFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    with _read_lock:
        known = _read.get(path)
    if known is not None and known[0] == digest and known[1].host == host:
        return known[1]
    chain = _parse(decode_json(raw, path), path, host)
    with _read_lock:
        if len(_read) >= _READ_KEEP:
            _read.clear()
        _read[path] = (digest, chain)
    return chain


def _parse(doc: object, path: Path, host: str) -> Chain:
    if isinstance(doc, dict) and doc.get("format", FORMAT) != FORMAT:
        raise DamagedFileError(f"{path} has format {doc['format']!r}; this appliance reads format {FORMAT}")
    points = as_type(doc, _Catalog, path).points
    for p in points:
        check_point_names(path, p)
    return Chain(host=host, points=points)


def check_point_names(path: Path, point: Point) -> None:
    """Point ids and slots become file names: a catalog must not lead a command outside the chain's folder."""
    for name in (point.id, *(d.slot for d in point.disks)):
        if not _PLAIN_NAME.match(name):
            raise damaged(path, f"{name!r} is not a point id or disk slot")
    for d in point.disks:
        if d.file != point_file(d.slot, point.id):
            raise damaged(path, f"point {point.id} names its {d.slot} file {d.file!r}")


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
        "consistency": None
        if p.consistency is None
        else {
            "kind": p.consistency.kind,
            "seconds": p.consistency.seconds,
            "detail": p.consistency.detail,
            "passes": p.consistency.passes,
        },
        "dropping": p.dropping,
    }
