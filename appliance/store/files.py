# SPDX-License-Identifier: GPL-2.0-or-later
"""Durable small-file writes: a record is either the old one or the new one, never half of each."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from appliance.errors import StoreFullError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """A temporary file of its own (two writers never share one), fsync, rename over the old file, fsync
    the folder: readers see the old content or the new one, and of two concurrent writers one wins whole."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(f"no room to write {path.name}: the appliance's disk is full") from exc
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def private_dir(path: Path) -> Path:
    """A folder only root can read: keys, host records and backups live in such folders.

    Only a folder this call creates gets its mode set: an existing one (say `--home /tmp`) is the
    operator's, and is left exactly as it is."""
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        try:
            missing.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(missing, 0o700)  # mkdir's mode is masked by the umask
    return path
