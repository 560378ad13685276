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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from appliance.domain.models import HostKey
from appliance.store.files import private_dir, read_as, write_json
from appliance.store.layout import Home

T = TypeVar("T")
PROGRESS, CUTOVER, TARGET_KEY = ".json", ".cutover", ".target-key.json"


@dataclass(frozen=True, slots=True)
class _PinnedTarget:
    address: str
    port: int
    key_type: str
    base64: str
    fingerprint: str


def _folder(home: Home) -> Path:
    return private_dir(home.failback_dir)


def _work(home: Home, host: str) -> Path:
    return home.failover_dir(host) / "failback"


def progress_path(home: Home, host: str) -> Path:
    return home.failback_file(host, PROGRESS)


def save_progress(home: Home, host: str, doc: dict[str, Any]) -> None:
    _folder(home)
    write_json(progress_path(home, host), doc)


def load_progress(home: Home, host: str, kind: type[T]) -> T | None:
    """The progress record as `kind` (the use case's own dataclass), every field checked."""
    path = progress_path(home, host)
    return read_as(path, kind) if path.exists() else None


def request_cutover(home: Home, host: str) -> None:
    _folder(home)
    home.failback_file(host, CUTOVER).touch()


def cutover_requested(home: Home, host: str) -> bool:
    return home.failback_file(host, CUTOVER).exists()


def clear_cutover(home: Home, host: str) -> None:
    home.failback_file(host, CUTOVER).unlink(missing_ok=True)


def load_target_key(home: Home, host: str) -> tuple[str, int, HostKey] | None:
    """(address, port, key) pinned by an earlier run of this host's failback, if any."""
    path = home.failback_file(host, TARGET_KEY)
    if not path.exists():
        return None
    pinned = read_as(path, _PinnedTarget)
    return pinned.address, pinned.port, HostKey(pinned.key_type, pinned.base64, pinned.fingerprint)


def save_target_key(home: Home, host: str, address: str, port: int, key: HostKey) -> None:
    doc = {"address": address, "port": port, "key_type": key.key_type, "base64": key.base64,
           "fingerprint": key.fingerprint}  # fmt: skip
    _folder(home)
    write_json(home.failback_file(host, TARGET_KEY), doc)


def work_dir(home: Home, host: str) -> Path:
    """An empty private folder for the ledgers and copies of a failback that starts now."""
    shutil.rmtree(_work(home, host), ignore_errors=True)
    return private_dir(_work(home, host))


def remove_work(home: Home, host: str) -> None:
    shutil.rmtree(_work(home, host), ignore_errors=True)


def remove_all(home: Home, host: str) -> None:
    """Every failback file of the host (when the host itself is removed)."""
    for suffix in (PROGRESS, CUTOVER, TARGET_KEY):
        home.failback_file(host, suffix).unlink(missing_ok=True)
    remove_work(home, host)
