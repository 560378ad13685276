# SPDX-License-Identifier: GPL-2.0-or-later
"""The alerts' files under APPLIANCE_HOME/alerts (a folder only root reads, every file 0600):

channels.json         the channels (mail servers, webhooks), without their secrets
<channel>.secret      a channel's secret alone: the SMTP password, or the webhook's whole URL (a chat
                      hook's URL carries its token); never in the JSON, never in a log
incidents.json        the incidents open now, and resolved ones still remembered (domain.alerts)
outbox.json           messages not yet delivered, with their attempts and their next try
lock                  held by whoever checks or delivers: the daemon's watcher and `alert check` take turns
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from appliance.domain.alerts import Channel, Incident, Message, validate_channel_name
from appliance.errors import AlertError
from appliance.store.files import private_dir, read_as, write_atomic, write_json
from appliance.store.layout import Home

T = TypeVar("T")
CHANNELS, INCIDENTS, OUTBOX, LOCK = "channels.json", "incidents.json", "outbox.json", "lock"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message waiting for one channel."""

    id: str
    channel: str
    message: Message
    created: datetime
    next_try: datetime
    attempts: int = 0
    last_error: str = ""


def folder(home: Home) -> Path:
    return private_dir(home.alerts_dir)


def _jsonable(value: object) -> object:
    """A record as JSON: times as ISO 8601 text, tuples as arrays."""
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _read_list(home: Home, name: str, kind: type[T]) -> list[T]:
    path = home.alerts_dir / name
    return read_as(path, list[kind]) if path.exists() else []  # type: ignore[valid-type]


def channels(home: Home) -> list[Channel]:
    return _read_list(home, CHANNELS, Channel)


def channel(home: Home, name: str) -> Channel:
    found = [c for c in channels(home) if c.name == name]
    if not found:
        raise AlertError(f"no alert channel named {name!r}", hint="`appliance alert list` lists them")
    return found[0]


def save_channel(home: Home, new: Channel, secret: str) -> None:
    """Add a channel (its secret first: a listed channel always has its secret). :raises AlertError: taken."""
    validate_channel_name(new.name)
    known = channels(home)
    if any(c.name == new.name for c in known):
        raise AlertError(f"an alert channel named {new.name!r} exists", hint="`appliance alert remove` it first")
    secret_path = folder(home) / f"{new.name}.secret"
    if secret:
        write_atomic(secret_path, secret.encode(), mode=0o600)
    else:
        secret_path.unlink(missing_ok=True)
    write_json(home.alerts_dir / CHANNELS, _jsonable([*known, new]))


def remove_channel(home: Home, name: str) -> None:
    """:raises AlertError: no such channel."""
    channel(home, name)
    write_json(home.alerts_dir / CHANNELS, _jsonable([c for c in channels(home) if c.name != name]))
    (home.alerts_dir / f"{validate_channel_name(name)}.secret").unlink(missing_ok=True)


def secret(home: Home, name: str) -> str:
    """The channel's secret ("" if it has none)."""
    path = home.alerts_dir / f"{validate_channel_name(name)}.secret"
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise AlertError(f"cannot read {path}: {exc.strerror}") from exc


def incidents(home: Home) -> list[Incident]:
    return _read_list(home, INCIDENTS, Incident)


def save_incidents(home: Home, found: list[Incident]) -> None:
    folder(home)
    write_json(home.alerts_dir / INCIDENTS, _jsonable(found))


def outbox(home: Home) -> list[Outgoing]:
    return _read_list(home, OUTBOX, Outgoing)


def save_outbox(home: Home, waiting: list[Outgoing]) -> None:
    folder(home)
    write_json(home.alerts_dir / OUTBOX, _jsonable(waiting))


@contextlib.contextmanager
def locked(home: Home) -> Iterator[None]:
    """Held while incidents or the outbox are read and rewritten: one writer at a time, the others wait."""
    fd = os.open(folder(home) / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
