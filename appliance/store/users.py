# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's users and API tokens (`web/users.json`, `web/tokens.json`, both 0600).

A password is kept only as its argon2 hash, a token only as its SHA-256: neither the store nor a log
ever holds one in the clear. A damaged file is a DamagedFileError naming it (nobody can log in until it
is repaired or the user is added again: the console fails closed)."""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path

from appliance.domain.users import Token, User
from appliance.store.console import folder
from appliance.store.files import read_as, write_json
from appliance.store.layout import Home

_lock = threading.Lock()


def _users_path(home: Home) -> Path:
    return folder(home) / "users.json"


def _tokens_path(home: Home) -> Path:
    return folder(home) / "tokens.json"


def load_all(home: Home) -> dict[str, User]:
    path = _users_path(home)
    return read_as(path, dict[str, User]) if path.exists() else {}


def save(home: Home, user: User) -> None:
    with _lock:
        users = load_all(home)
        users[user.name] = user
        _write_users(home, users)


def remove(home: Home, name: str) -> bool:
    """Remove a user and every token of theirs; whether there was such a user."""
    with _lock:
        users = load_all(home)
        found = users.pop(name, None) is not None
        _write_users(home, users)
        tokens = {k: t for k, t in load_tokens(home).items() if t.user != name}
        _write_tokens(home, tokens)
    return found


def _write_users(home: Home, users: dict[str, User]) -> None:
    write_json(_users_path(home), {n: {**asdict(u), "created": u.created.isoformat()} for n, u in users.items()})


def load_tokens(home: Home) -> dict[str, Token]:
    path = _tokens_path(home)
    return read_as(path, dict[str, Token]) if path.exists() else {}


def save_token(home: Home, token: Token) -> None:
    with _lock:
        tokens = load_tokens(home)
        tokens[token.id] = token
        _write_tokens(home, tokens)


def remove_token(home: Home, token_id: str) -> bool:
    with _lock:
        tokens = load_tokens(home)
        found = tokens.pop(token_id, None) is not None
        _write_tokens(home, tokens)
    return found


def _write_tokens(home: Home, tokens: dict[str, Token]) -> None:
    write_json(_tokens_path(home), {i: {**asdict(t), "created": t.created.isoformat()} for i, t in tokens.items()})
