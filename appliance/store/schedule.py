# SPDX-License-Identifier: GPL-2.0-or-later
"""What the scheduler last ran, per job, with its outcome (`schedule.json`).

Only a history: it says when each job last ran, nothing else depends on it. A damaged file is reported
(DamagedFileError naming it); the next outcome recorded keeps it aside as `schedule.json.damaged` and starts
a new history, so the scheduler mends it by itself.
"""

from __future__ import annotations

import threading
from dataclasses import asdict

from appliance.errors import DamagedFileError
from appliance.store.files import read_as, write_json
from appliance.store.journal import Entry
from appliance.store.layout import Home

NAME = "schedule.json"
_record_lock = threading.Lock()  # the scheduler records outcomes from its job threads


Outcome = Entry  # a job's outcome, as the journal keeps it


def load(home: Home) -> dict[tuple[str, str], Outcome]:
    """:raises DamagedFileError: the file is damaged or not a history (the message names it)."""
    path = home.root / NAME
    if not path.exists():
        return {}
    return {(o.kind, o.host): o for o in read_as(path, list[Outcome])}


def record(home: Home, outcome: Outcome) -> None:
    path = home.root / NAME
    with _record_lock:
        try:
            runs = load(home)
        except DamagedFileError:
            runs = {}
            path.replace(path.with_name(NAME + ".damaged"))
        runs[(outcome.kind, outcome.host)] = outcome
        docs = [{**asdict(o), "started": o.started.isoformat()} for o in runs.values()]
        write_json(path, sorted(docs, key=lambda d: (d["kind"], d["host"])))
