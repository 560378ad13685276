# SPDX-License-Identifier: GPL-2.0-or-later
"""nbdkit's Python plugin for a failover from a cloud store: one disk of one point, read-only.

nbdkit loads this file (adapters/nbdkit.py starts it) and calls the functions below; it is wired here,
like appliance/bootstrap.py, from the store's records (credentials and key, root's alone, read from
APPLIANCE_HOME: no secret is on nbdkit's command line), the S3 adapter, and services/cloud_cache.py,
which does the work. Parameters: site= (the virtualenv's site-packages), log=, home=, store=,
manifest= and version= (the point's manifest object), slot= (disk0 ...), cache= (the cache file).
"""

from __future__ import annotations

import builtins
import site
import sys
import threading
from typing import Any

API_VERSION = 2

_params: dict[str, str] = {}
_disk: Any = None


def config(key: str, value: str) -> None:
    if key == "site":  # the virtualenv's packages, ahead of any the system's python3 has (e.g. an older botocore)
        before = list(sys.path)
        site.addsitedir(value)
        sys.path[:] = [p for p in sys.path if p not in before] + before
    else:
        _params[key] = value


def config_complete() -> None:
    global _disk
    from pathlib import Path

    from appliance import log
    from appliance.adapters.s3 import S3Bucket
    from appliance.services.cloud.bucket import access_of, sealer_of
    from appliance.services.cloud_cache import CachedDisk
    from appliance.services.cloud_reader import DiskReader, PackHeaders
    from appliance.store import cloud as records
    from appliance.store.layout import Home
    from appliance.transfer.sealed import open_manifest

    log.configure(json=True, level="info", stream=builtins.open(_params["log"], "a", buffering=1))  # noqa: SIM115
    home = Home(Path(_params["home"]))
    store = records.load(home, _params["store"])
    bucket = S3Bucket(access_of(home, store))
    sealer = sealer_of(home, store)
    version = _params.get("version") or None
    point = open_manifest(sealer, bucket.get(_params["manifest"], version))
    disk = next(d for d in point.disks if d.slot == _params["slot"])
    reader = DiskReader(bucket, sealer, point, disk, PackHeaders(bucket, sealer))
    _disk = CachedDisk(reader, Path(_params["cache"]))


def thread_model() -> int:
    import nbdkit  # type: ignore[import-not-found]

    return int(nbdkit.THREAD_MODEL_PARALLEL)


def after_fork() -> None:
    """nbdkit forked into the background: only now may threads start."""
    threading.Thread(target=_disk.stream, name="cloud-stream", daemon=True).start()


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's name
    return 1


def get_size(handle: int) -> int:
    return int(_disk.size)


def can_write(handle: int) -> bool:
    return False


def can_multi_conn(handle: int) -> bool:
    return True


def pread(handle: int, buf: Any, offset: int, flags: int) -> None:
    buf[:] = _disk.read(offset, len(buf))


def cleanup() -> None:
    if _disk is not None:
        _disk.close()
