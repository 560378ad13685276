# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's users and API tokens (`web/users.json`, `web/tokens.json`, both 0600).

A password is kept only as its argon2 hash, a token only as its SHA-256: neither the store nor a log
ever holds one in the clear. A damaged file is a DamagedFileError naming it (nobody can log in until it
is repaired or the user is added again: the console fails closed)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from appliance.domain.users import Token, User
from appliance.store.console import folder
from appliance.store.files import read_as, write_json
from appliance.store.layout import Home

_lock = threading.Lock()
T = TypeVar("T", User, Token)


def _path(home: Home, kind: type[User] | type[Token]) -> Path:
    return folder(home) / ("users.json" if kind is User else "tokens.json")


def _load(home: Home, kind: type[T]) -> dict[str, T]:
    path = _path(home, kind)
    return read_as(path, dict[str, kind]) if path.exists() else {}  # type: ignore[valid-type]


def _write(home: Home, kind: type[T], records: dict[str, T]) -> None:
    write_json(_path(home, kind), {k: {**asdict(r), "created": r.created.isoformat()} for k, r in records.items()})


def _edit(home: Home, kind: type[T], change: Callable[[dict[str, T]], bool]) -> bool:
    """Read the records of `kind`, change them in place, write them back; what `change` says."""
    with _lock:
        records = _load(home, kind)
        said = change(records)
        _write(home, kind, records)
    return said


def load_all(home: Home) -> dict[str, User]:
    return _load(home, User)


def load_tokens(home: Home) -> dict[str, Token]:
    return _load(home, Token)


def save(home: Home, user: User) -> None:
    _edit(home, User, _put(user.name, user))


def save_token(home: Home, token: Token) -> None:
    _edit(home, Token, _put(token.id, token))


def _put(key: str, record: T) -> Callable[[dict[str, T]], bool]:
    def put(records: dict[str, T]) -> bool:
        records[key] = record
        return True

    return put


def remove(home: Home, name: str) -> bool:
    """Remove a user and every token of theirs; whether there was such a user."""
    found = _edit(home, User, lambda users: users.pop(name, None) is not None)
    _edit(home, Token, lambda tokens: _drop_where(tokens, lambda t: t.user == name))
    return found


def remove_token(home: Home, token_id: str) -> bool:
    return _edit(home, Token, lambda tokens: tokens.pop(token_id, None) is not None)


def _drop_where(tokens: dict[str, Token], gone: Callable[[Token], bool]) -> bool:
    for key in [k for k, t in tokens.items() if gone(t)]:
        del tokens[key]
    return True
