# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's users and API tokens: adding, checking, removing. The console and the CLI both go here."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import replace
from datetime import UTC, datetime

from appliance.domain.users import (
    Token,
    User,
    validate_password,
    validate_role,
    validate_user_name,
)
from appliance.errors import UserError
from appliance.log import get_logger
from appliance.ports import PasswordHasher
from appliance.store import users as records
from appliance.store.layout import Home

log = get_logger(__name__)
TOKEN_PREFIX = "apl_"
# Checked against when the user does not exist, so a wrong name costs the same time as a wrong password.
_DUMMY: dict[int, str] = {}


def add(home: Home, hasher: PasswordHasher, name: str, role: str, password: str) -> User:
    validate_user_name(name)
    validate_role(role)
    if name in records.load_all(home):
        raise UserError(f"user {name} exists", hint=f"`appliance user passwd {name}` sets a new password")
    user = User(name, role, hasher.hash(validate_password(password)), datetime.now(UTC))
    records.save(home, user)
    log.info("user.added", user=name, role=role)
    return user


def named(home: Home, name: str) -> User | None:
    """The user called `name`, or None."""
    return records.load_all(home).get(name)


def find(home: Home, name: str) -> User:
    """:raises UserError: no such user."""
    user = named(home, name)
    if user is None:
        raise UserError(f"no user {name!r}", hint="`appliance user list` shows them")
    return user


def set_password(home: Home, hasher: PasswordHasher, name: str, password: str) -> None:
    user = find(home, name)
    records.save(home, replace(user, password_hash=hasher.hash(validate_password(password))))
    log.info("user.password_set", user=name)


def set_role(home: Home, name: str, role: str) -> None:
    records.save(home, replace(find(home, name), role=validate_role(role)))
    log.info("user.role_set", user=name, role=role)


def remove(home: Home, name: str) -> None:
    if not records.remove(home, name):
        raise UserError(f"no user {name!r}", hint="`appliance user list` shows them")
    log.info("user.removed", user=name)


def list_users(home: Home) -> list[User]:
    return sorted(records.load_all(home).values(), key=lambda u: u.name)


def authenticate(home: Home, hasher: PasswordHasher, name: str, password: str) -> User | None:
    """The user if the password is theirs; None otherwise. A missing user costs a hash check too (no timing
    tells which names exist); a hash made with older parameters is renewed on a good login."""
    user = records.load_all(home).get(name) if len(password) <= 1024 else None
    if user is None:
        if 0 not in _DUMMY:
            _DUMMY[0] = hasher.hash(secrets.token_hex(16))
        hasher.verify(_DUMMY[0], password[:1024])
        return None
    if not hasher.verify(user.password_hash, password):
        return None
    if hasher.needs_rehash(user.password_hash):
        records.save(home, replace(user, password_hash=hasher.hash(password)))
    return user


def create_token(home: Home, name: str, label: str) -> str:
    """A new API token for user `name`: returned once, kept only as its SHA-256."""
    find(home, name)
    token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
    records.save_token(home, Token(token_id, name, label, _digest(secret), datetime.now(UTC)))
    log.info("user.token_created", user=name, token=token_id)
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def tokens(home: Home) -> list[Token]:
    return sorted(records.load_tokens(home).values(), key=lambda t: (t.user, t.created))


def revoke_token(home: Home, token_id: str) -> None:
    if not records.remove_token(home, token_id):
        raise UserError(f"no token {token_id!r}", hint="`appliance user token list` shows them")
    log.info("user.token_revoked", token=token_id)


def user_of_token(home: Home, presented: str) -> User | None:
    """The user a presented token belongs to, or None (malformed, unknown, revoked, or its user is gone)."""
    body = presented.removeprefix(TOKEN_PREFIX)
    token_id, sep, secret = body.partition("_")
    if not presented.startswith(TOKEN_PREFIX) or not sep:
        return None
    token = records.load_tokens(home).get(token_id)
    if token is None or not hmac.compare_digest(token.digest, _digest(secret)):
        return None
    return records.load_all(home).get(token.user)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
