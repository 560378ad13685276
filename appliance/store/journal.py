# SPDX-License-Identifier: GPL-2.0-or-later
"""Every job the appliance ran, newest last (`jobs.jsonl`): the console's job history, a host's last errors,
and what the alerts count ("a backup failed twice in a row").

One JSON line per finished job, appended with O_APPEND (a line is written whole, so the daemon, the console
and a CLI command may append at once). A line that does not read (a crash mid-append, a hand edit) is
skipped: the journal is a history, nothing is lost with one entry. It is cut to its newest KEEP entries
once it holds twice as many.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.store.files import full_disk_as_store_full, read_as, write_atomic, write_json
from appliance.store.layout import Home

NAME = "jobs.jsonl"
TOTALS = "jobs-totals.json"
KEEP = 2000
_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Entry:
    """A finished job. `origin`: schedule (the daemon), console (a user's button) or cli."""

    kind: str
    host: str
    started: datetime
    seconds: float
    ok: bool
    message: str
    origin: str = "schedule"
    user: str = ""
    hint: str = ""  # what the failure's error said to do about it


def path(home: Home) -> Path:
    return home.root / NAME


def append(home: Home, entry: Entry) -> None:
    """Add one finished job. :raises StoreFullError: no room for the line."""
    line = (json.dumps({**asdict(entry), "started": entry.started.isoformat()}, sort_keys=True) + "\n").encode()
    target = path(home)
    with _lock, full_disk_as_store_full("the job history"):
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            _count(home, entry)
            if os.fstat(fd).st_size > 2 * KEEP * 256:
                _cut(target)
        finally:
            os.close(fd)


def _count(home: Home, entry: Entry) -> None:
    """Jobs by kind and outcome since the appliance was set up: the metrics' counters, which must never go
    down (the journal itself is cut). Called with the journal's lock held."""
    counts = totals(home)
    outcome = "ok" if entry.ok else "failed"
    counts.setdefault(entry.kind, {}).setdefault(outcome, 0)
    counts[entry.kind][outcome] += 1
    write_json(home.root / TOTALS, counts)


def totals(home: Home) -> dict[str, dict[str, int]]:
    """{kind: {"ok": n, "failed": n}}; empty if the file is missing or damaged."""
    path = home.root / TOTALS
    if not path.exists():
        return {}
    try:
        return read_as(path, dict[str, dict[str, int]])
    except ApplianceError:
        return {}


def _cut(target: Path) -> None:
    """Keep the newest KEEP entries (called with the journal's lock held)."""
    entries = target.read_bytes().splitlines(keepends=True)
    if len(entries) > 2 * KEEP:
        write_atomic(target, b"".join(entries[-KEEP:]))


def load(home: Home, host: str | None = None, kind: str | None = None, limit: int = KEEP) -> list[Entry]:
    """Finished jobs, oldest first (the newest `limit`), of one host and kind if given."""
    try:
        raw = path(home).read_bytes()
    except FileNotFoundError:
        return []
    found: list[Entry] = []
    for line in raw.splitlines():
        entry = _entry(line)
        if entry is not None and (host is None or entry.host == host) and (kind is None or entry.kind == kind):
            found.append(entry)
    return found[-limit:]


def _entry(line: bytes) -> Entry | None:
    try:
        doc = json.loads(line)
        return Entry(
            kind=str(doc["kind"]), host=str(doc["host"]), started=datetime.fromisoformat(doc["started"]),
            seconds=float(doc["seconds"]), ok=bool(doc["ok"]), message=str(doc["message"]),
            origin=str(doc.get("origin", "schedule")), user=str(doc.get("user", "")), hint=str(doc.get("hint", "")),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None


# -- points merged away by consolidation: the host's timeline shows them after they are gone -------------------

MERGED = "merged.jsonl"


@dataclass(frozen=True, slots=True)
class Merged:
    host: str
    point: str
    created: datetime  # when the point was taken
    into: str  # the newer point that holds its data now
    time: datetime  # when it was merged


def remember_merged(home: Home, merged: Merged) -> None:
    """Only a history: a disk too full for the line loses the line, never the merge."""
    line = (json.dumps({**asdict(merged), "created": merged.created.isoformat(), "time": merged.time.isoformat()},
                       sort_keys=True) + "\n").encode()  # fmt: skip
    with _lock, contextlib.suppress(OSError):
        fd = os.open(home.root / MERGED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def merged(home: Home, host: str, limit: int = 100) -> list[Merged]:
    """The host's points merged away, oldest first (the newest `limit`)."""
    try:
        raw = (home.root / MERGED).read_bytes()
    except FileNotFoundError:
        return []
    found = []
    for line in raw.splitlines():
        try:
            doc = json.loads(line)
            if doc["host"] == host:
                found.append(Merged(str(doc["host"]), str(doc["point"]), datetime.fromisoformat(doc["created"]),
                                    str(doc["into"]), datetime.fromisoformat(doc["time"])))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            continue
    return found[-limit:]
