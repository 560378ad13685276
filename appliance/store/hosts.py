# SPDX-License-Identifier: GPL-2.0-or-later
"""Protected-host records: one JSON file per host, readable by root only."""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import typing
from pathlib import Path
from typing import Any

from appliance.domain.models import Host, HostKey
from appliance.errors import ChainError, ConfigError, HostNotFoundError
from appliance.store import failback, recovery
from appliance.store.files import read_json, write_json
from appliance.store.layout import Home
from appliance.store.lock import HostLock


def load(home: Home, name: str) -> Host:
    """:raises HostNotFoundError: no record of that name.
    :raises ConfigError: the record is damaged, foreign or another host's (the message names the file)."""
    path = home.host_record(name)
    if not path.exists():
        raise HostNotFoundError(f"no protected host named {name!r}")
    try:
        return _host(read_json(path), name)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"host record {path} is unreadable: {exc}") from exc


def _host(doc: Any, name: str) -> Host:
    """A host from its record, every field of the type Host declares (a hand edit or a foreign file is caught
    here, not as a TypeError deep in a job)."""
    if not isinstance(doc, dict):
        raise TypeError(f"it holds {doc!r:.40}, not a host record")
    if doc.get("name") != name:
        raise ValueError(f"it names the host {doc.get('name')!r:.40}, not {name!r}")
    kinds = _field_types()
    unknown = sorted(set(doc) - set(kinds))
    required = [f.name for f in dataclasses.fields(Host) if f.default is f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in doc]
    if unknown or missing:
        raise ValueError(
            "; ".join(f"{what} {keys}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys)
        )
    return Host(**{key: _field(key, value, kinds[key]) for key, value in doc.items()})


def _field(key: str, value: Any, kind: Any) -> Any:
    if kind is HostKey:
        if not isinstance(value, dict) or sorted(value) != ["base64", "fingerprint", "key_type"]:
            raise TypeError(f"{key} is {value!r:.40}, not a host key")
        return HostKey(**{k: _field(f"{key}.{k}", v, str) for k, v in value.items()})
    if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a JSON list, or null for none
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{key} is {value!r:.40}, not a list of strings")
        return tuple(value)
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
    }
    if not ok.get(kind, False):
        raise TypeError(f"{key} is {value!r:.40}, not {getattr(kind, '__name__', kind)}")
    return float(value) if kind is float else value


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Host)


def save(home: Home, host: Host) -> None:
    home.ensure()
    write_json(home.host_record(host.name), dataclasses.asdict(host))


def exists(home: Home, name: str) -> bool:
    return home.host_record(name).exists()


def names(home: Home) -> list[str]:
    if not home.hosts_dir.exists():
        return []
    return sorted(p.stem for p in home.hosts_dir.glob("*.json"))


def install_key(home: Home, name: str, source: Path, *, failback: bool = False) -> str:
    """Copy the host's private key (or its failback target's) under APPLIANCE_HOME (0600); the record
    refers to the copy."""
    home.ensure()
    dest = home.failback_key_file(name) if failback else home.key_file(name)
    if source.resolve() != dest.resolve():
        try:
            shutil.copyfile(source, dest)
        except OSError as exc:
            raise ConfigError(f"cannot read SSH key {source}: {exc.strerror}") from exc
    dest.chmod(0o600)
    return str(dest.relative_to(home.root))


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
