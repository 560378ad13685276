# SPDX-License-Identifier: GPL-2.0-or-later
"""Protected-host records: one JSON file per host, readable by root only."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from appliance.domain.models import HOST_NAME, Host
from appliance.errors import ChainError, DamagedFileError, HostNotFoundError
from appliance.store import failback, recovery
from appliance.store.files import copy_private_key, damaged, read_as, record_names, write_json
from appliance.store.layout import Home
from appliance.store.lock import HostLock


def load(home: Home, name: str) -> Host:
    """:raises ConfigError: not a host name. HostNotFoundError: no record. DamagedFileError: a damaged one."""
    path = home.host_record(name)
    if not path.exists():
        raise HostNotFoundError(f"no protected host named {name!r}")
    host = read_as(path, Host)
    if host.name != name:
        raise damaged(path, f"it is the record of host {host.name!r}")
    return host


def load_all(home: Home) -> tuple[list[Host], dict[str, DamagedFileError]]:
    """Every host whose record reads, and what is wrong with each other file under hosts/: one damaged
    record never hides the other hosts from a listing or the scheduler."""
    found, unreadable = [], {}
    for path in sorted(home.hosts_dir.glob("*.json")) if home.hosts_dir.exists() else []:
        try:
            if not HOST_NAME.match(path.stem):
                raise DamagedFileError(f"{path} is not the appliance's: {path.stem!r} is not a host name")
            found.append(load(home, path.stem))
        except DamagedFileError as exc:
            unreadable[path.stem] = exc
    return found, unreadable


def save(home: Home, host: Host) -> None:
    home.ensure()
    write_json(home.host_record(host.name), dataclasses.asdict(host))


def exists(home: Home, name: str) -> bool:
    return home.host_record(name).exists()


def names(home: Home) -> list[str]:
    return record_names(home.hosts_dir, HOST_NAME)


def install_key(home: Home, name: str, source: Path, *, failback: bool = False) -> str:
    """Copy the host's private key (or its failback target's) under APPLIANCE_HOME (0600); the record
    refers to the copy."""
    home.ensure()
    dest = home.failback_key_file(name) if failback else home.key_file(name)
    return copy_private_key(source, dest, home.root)


def remove(home: Home, name: str) -> None:
    """The host's record and keys; its points and other files stay (see `purge`)."""
    home.host_record(name).unlink(missing_ok=True)
    home.key_file(name).unlink(missing_ok=True)
    home.failback_key_file(name).unlink(missing_ok=True)


def purge(home: Home, name: str) -> None:
    """Every file the appliance keeps for the host but its record and keys: its chain (under the host's
    lock, so never under a running job), recovery-VM folders, failback records, screenshots.

    :raises ChainLockedError: a job works on the host.
    :raises ChainError: a point is in use (a recovery VM runs or kept its writes).
    """
    chain_dir = home.chain_dir(name)
    with HostLock(chain_dir / "lock", name, "purge"):
        pins = recovery.pinned_points(home, name)
        if pins:
            point, why = next(iter(pins.items()))
            raise ChainError(f"{name}: point {point} is in use ({why}); nothing was removed",
                             hint=f"stop it first with `appliance failover stop {name}`")  # fmt: skip
        for path in sorted(chain_dir.rglob("*"), reverse=True):
            if path.name != "lock":
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        failback.remove_all(home, name)
        for folder in (home.failover_dir(name), home.screenshots_dir(name), home.run_dir / name):
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(chain_dir, ignore_errors=True)


def key_path(home: Home, host: Host) -> Path:
    return home.root / host.key_file
