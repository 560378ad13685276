# SPDX-License-Identifier: GPL-2.0-or-later
"""Protected-host records: one JSON file per host, readable by root only."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from appliance.domain.models import Host, HostKey
from appliance.errors import ConfigError, HostNotFoundError
from appliance.store.files import read_json, write_json
from appliance.store.layout import Home


def load(home: Home, name: str) -> Host:
    path = home.host_record(name)
    if not path.exists():
        raise HostNotFoundError(f"no protected host named {name!r}")
    try:
        doc = read_json(path)
        doc["host_key"] = HostKey(**doc["host_key"])
        for key in ("disks", "pre_hook", "post_hook"):
            doc[key] = tuple(doc.get(key) or ())
        return Host(**doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"host record {path} is unreadable: {exc}") from exc


def save(home: Home, host: Host) -> None:
    home.ensure()
    write_json(home.host_record(host.name), dataclasses.asdict(host))


def exists(home: Home, name: str) -> bool:
    return home.host_record(name).exists()


def names(home: Home) -> list[str]:
    if not home.hosts_dir.exists():
        return []
    return sorted(p.stem for p in home.hosts_dir.glob("*.json"))


def install_key(home: Home, name: str, source: Path) -> str:
    """Copy the host's private key under APPLIANCE_HOME (0600); the record refers to the copy."""
    home.ensure()
    dest = home.key_file(name)
    if source.resolve() != dest.resolve():
        try:
            shutil.copyfile(source, dest)
        except OSError as exc:
            raise ConfigError(f"cannot read SSH key {source}: {exc.strerror}") from exc
    dest.chmod(0o600)
    return str(dest.relative_to(home.root))


def remove(home: Home, name: str) -> None:
    home.host_record(name).unlink(missing_ok=True)
    home.key_file(name).unlink(missing_ok=True)


def key_path(home: Home, host: Host) -> Path:
    return home.root / host.key_file
