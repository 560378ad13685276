# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's users, their roles and what each role may do (pure).

Three roles, each allowed what the one before it may, and more:
- `viewer` sees every page and API answer (no secrets are in them);
- `operator` also presses the buttons: back up now, verify boot, fail over, stop a recovery VM, cut over a
  failback, open a recovery VM's console;
- `admin` also manages users and tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from appliance.errors import UserError

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)
USER_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024  # a longer one is refused before it is hashed (argon2 of megabytes is a denial of service)


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    password_hash: str
    created: datetime


@dataclass(frozen=True, slots=True)
class Token:
    """An API token for scripts: only its SHA-256 is kept; the token itself is shown once."""

    id: str  # the public part: names it in `user token list` and in logs
    user: str
    label: str
    digest: str  # sha256 of the secret part
    created: datetime


def validate_user_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise UserError(f"invalid user name {name!r}: use 1-32 lowercase letters, digits, '.', '-' or '_', "
                        "starting with a letter")  # fmt: skip
    return name


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"invalid role {role!r}: use {', '.join(ROLES)}")
    return role


def validate_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password is too short: use at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"the password is too long: use at most {MAX_PASSWORD} characters")
    return password


def allows(role: str, needed: str) -> bool:
    """Whether `role` may do what `needed` may (roles are ordered viewer < operator < admin)."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)
