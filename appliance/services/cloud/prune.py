# SPDX-License-Identifier: GPL-2.0-or-later
"""`cloud prune`: the bucket's retention on demand (`--dry-run` says what would go). The rules themselves are
in bucket.py, since a push applies them too: manifests no rule keeps are dropped (once their lock lets go),
then packs no manifest needs (once theirs does); nothing is re-uploaded.
"""

from __future__ import annotations

from appliance.errors import ConfigError
from appliance.ports import Tools
from appliance.services.cloud.bucket import apply_retention, open_store, refresh_points
from appliance.store import cloud as records
from appliance.store.cloud import Index
from appliance.store.layout import Home


def prune(home: Home, tools: Tools, name: str, dry_run: bool = False) -> list[str]:
    opened = open_store(home, tools, name)
    if not opened.store.keep:
        raise ConfigError(
            f"cloud store {name} has no retention policy", hint=f"`appliance cloud set {name} --keep-daily 30 ...`"
        )
    with records.locked(home, name, "prune"), Index(home, name) as index:
        refresh_points(index, opened.bucket, opened.sealer)
        return apply_retention(opened, index, dry_run)
