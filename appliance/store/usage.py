# SPDX-License-Identifier: GPL-2.0-or-later
"""How full the store's file system is, now and over time (`usage.json`): what "full in 23 days" is
judged from. A sample is kept at most once per SAMPLE_EVERY, for KEEP_DAYS."""

from __future__ import annotations

import contextlib
import os
import threading
from datetime import datetime, timedelta

from appliance.domain.health import UsageSample
from appliance.errors import ApplianceError
from appliance.store.files import read_as, write_json
from appliance.store.layout import Home

NAME = "usage.json"
SAMPLE_EVERY = timedelta(hours=1)
KEEP_DAYS = 60
_lock = threading.Lock()


def measure(home: Home, now: datetime) -> UsageSample:
    """The file system holding the store (the home itself until the first point), as `df` shows it."""
    where = home.store_dir if home.store_dir.exists() else home.root
    fs = os.statvfs(where)
    total = fs.f_blocks * fs.f_frsize
    return UsageSample(now, total - fs.f_bfree * fs.f_frsize, total)


def history(home: Home) -> list[UsageSample]:
    """The kept samples, oldest first (none if the file is missing or damaged: it is only a history)."""
    path = home.root / NAME
    if not path.exists():
        return []
    try:
        return read_as(path, list[UsageSample])
    except ApplianceError:
        return []


def sample(home: Home, now: datetime) -> list[UsageSample]:
    """Measure now; keep the sample if the newest kept one is SAMPLE_EVERY old. The history with now last."""
    current = measure(home, now)
    with _lock:
        kept = [s for s in history(home) if now - s.time <= timedelta(days=KEEP_DAYS) and s.time <= now]
        if not kept or now - kept[-1].time >= SAMPLE_EVERY:
            kept.append(current)
            with contextlib.suppress(ApplianceError):  # a full disk: the trend waits for room, the numbers now show
                write_json(home.root / NAME, [_doc(s) for s in kept])
            return kept
    return [*kept, current]


def _doc(s: UsageSample) -> dict[str, object]:
    return {"time": s.time.isoformat(), "used": s.used, "total": s.total}
