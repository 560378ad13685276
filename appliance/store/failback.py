# SPDX-License-Identifier: GPL-2.0-or-later
"""A failback's own files: its progress record, the cutover request, the target's pinned key and the
work folder of its ledgers and last-block copies.

$APPLIANCE_HOME/failback/<host>.json             progress, for `failback status` (kept after the end)
$APPLIANCE_HOME/failback/<host>.cutover          present: cut a manual failback over after its pass
$APPLIANCE_HOME/failback/<host>.target-key.json  the target's host key, pinned by the first run
$APPLIANCE_HOME/failover/<host>/failback/        ledgers and copies of the running failback
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from appliance.domain.models import HostKey
from appliance.store.files import private_dir, read_json, write_json
from appliance.store.layout import Home


def _folder(home: Home) -> Path:
    return private_dir(home.root / "failback")


def progress_path(home: Home, host: str) -> Path:
    return home.failback_dir / f"{host}.json"


def save_progress(home: Home, host: str, doc: dict[str, Any]) -> None:
    write_json(_folder(home) / f"{host}.json", doc)


def load_progress(home: Home, host: str) -> dict[str, Any] | None:
    path = progress_path(home, host)
    return dict(read_json(path)) if path.exists() else None


def request_cutover(home: Home, host: str) -> None:
    (_folder(home) / f"{host}.cutover").touch()


def cutover_requested(home: Home, host: str) -> bool:
    return (home.failback_dir / f"{host}.cutover").exists()


def clear_cutover(home: Home, host: str) -> None:
    (home.failback_dir / f"{host}.cutover").unlink(missing_ok=True)


def load_target_key(home: Home, host: str) -> tuple[str, int, HostKey] | None:
    """(address, port, key) pinned by an earlier run of this host's failback, if any."""
    path = home.failback_dir / f"{host}.target-key.json"
    if not path.exists():
        return None
    doc = read_json(path)
    return doc["address"], int(doc["port"]), HostKey(doc["key_type"], doc["base64"], doc["fingerprint"])


def save_target_key(home: Home, host: str, address: str, port: int, key: HostKey) -> None:
    doc = {"address": address, "port": port, "key_type": key.key_type, "base64": key.base64,
           "fingerprint": key.fingerprint}  # fmt: skip
    write_json(_folder(home) / f"{host}.target-key.json", doc)


def work_dir(home: Home, host: str) -> Path:
    """An empty private folder for the ledgers and copies of a failback that starts now."""
    folder = home.failover_dir(host) / "failback"
    shutil.rmtree(folder, ignore_errors=True)
    return private_dir(folder)


def remove_work(home: Home, host: str) -> None:
    shutil.rmtree(home.failover_dir(host) / "failback", ignore_errors=True)


def remove_all(home: Home, host: str) -> None:
    """Every failback file of the host (when the host itself is removed)."""
    for name in (f"{host}.json", f"{host}.cutover", f"{host}.target-key.json"):
        (home.failback_dir / name).unlink(missing_ok=True)
    remove_work(home, host)
