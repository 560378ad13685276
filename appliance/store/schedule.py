# SPDX-License-Identifier: GPL-2.0-or-later
"""What the scheduler last ran, per job, with its outcome (`schedule.json`).

Only a history: it says when each job last ran, nothing else depends on it. A damaged file is reported
(ConfigError naming it); the next outcome recorded keeps it aside as `schedule.json.damaged` and starts
a new history, so the scheduler mends it by itself.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from appliance.store.files import read_json, write_json
from appliance.store.layout import Home

NAME = "schedule.json"
_record_lock = threading.Lock()  # the scheduler records outcomes from its job threads


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    host: str
    started: datetime
    seconds: float
    ok: bool
    message: str


def load(home: Home) -> dict[tuple[str, str], Outcome]:
    """:raises ConfigError: the file is damaged or not a history (the message names it)."""
    path = home.root / NAME
    try:
        docs = read_json(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    try:
        if not isinstance(docs, list):
            raise TypeError(f"it holds {docs!r:.40}, not a list of outcomes")
        outcomes = [_outcome(doc) for doc in docs]
    except (TypeError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    return {(o.kind, o.host): o for o in outcomes}


def record(home: Home, outcome: Outcome) -> None:
    path = home.root / NAME
    with _record_lock:
        try:
            runs = load(home)
        except ConfigError:
            runs = {}
            path.replace(path.with_name(NAME + ".damaged"))
        runs[(outcome.kind, outcome.host)] = outcome
        docs = [{**asdict(o), "started": o.started.isoformat()} for o in runs.values()]
        write_json(path, sorted(docs, key=lambda d: (d["kind"], d["host"])))


_FIELDS: dict[str, type | tuple[type, ...]] = {"kind": str, "host": str, "started": str, "seconds": (int, float),
                                              "ok": bool, "message": str}  # fmt: skip


def _outcome(doc: Any) -> Outcome:
    if not isinstance(doc, dict):
        raise TypeError(f"an outcome is {doc!r:.40}, not an object")
    if set(doc) != set(_FIELDS):
        raise ValueError(f"an outcome has the fields {sorted(doc)}, not {sorted(_FIELDS)}")
    for key, kind in _FIELDS.items():
        if not isinstance(doc[key], kind) or (kind is not bool and isinstance(doc[key], bool)):
            raise TypeError(f"{key} is {doc[key]!r:.40}")
    started = datetime.fromisoformat(doc["started"])
    if started.tzinfo is None:
        raise ValueError(f"started {doc['started']!r} has no time zone")
    if not math.isfinite(doc["seconds"]):
        raise ValueError(f"seconds is {doc['seconds']}")
    return Outcome(**{**doc, "started": started})


def _damaged(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(
        f"the scheduler's history {path} is damaged: {exc}",
        hint="it only records when jobs last ran: remove it, or let the daemon replace it with a new one",
    )
