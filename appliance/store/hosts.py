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
from appliance.errors import ConfigError, HostNotFoundError
from appliance.store.files import read_json, write_json
from appliance.store.layout import Home


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
