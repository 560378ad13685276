# SPDX-License-Identifier: GPL-2.0-or-later
"""What the scheduler last ran, per job, with its outcome (`schedule.json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from appliance.store.files import read_as, write_json
from appliance.store.layout import Home

NAME = "schedule.json"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    host: str
    started: datetime
    seconds: float
    ok: bool
    message: str


def load(home: Home) -> dict[tuple[str, str], Outcome]:
    path = home.root / NAME
    if not path.exists():
        return {}
    return {(o.kind, o.host): o for o in read_as(path, list[Outcome])}


def record(home: Home, outcome: Outcome) -> None:
    runs = load(home)
    runs[(outcome.kind, outcome.host)] = outcome
    docs = [{**asdict(o), "started": o.started.isoformat()} for o in runs.values()]
    write_json(home.root / NAME, sorted(docs, key=lambda d: (d["kind"], d["host"])))
