# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's sessions, login limits, users and tokens, and its listen address (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.adapters.passwords import Argon2Passwords
from appliance.domain.users import allows
from appliance.errors import UserError, WebError
from appliance.services import users
from appliance.store.layout import Home
from appliance.web import auth
from appliance.web.pages import _local
from appliance.web.server import Listen


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(auth.time, "monotonic", c)
    return c


def test_a_session_ends_when_idle_and_at_its_lifetime(clock: Clock) -> None:
    sessions = auth.Sessions(idle=60, lifetime=300)
    s = sessions.start("alice")
    for _ in range(4):  # used every 50 s: alive past its idle time...
        clock.now += 50
        assert sessions.find(s.id) is s
    clock.now += 61
    assert sessions.find(s.id) is None  # ... until a minute without a request
    s = sessions.start("alice")
    for _ in range(6):
        clock.now += 55
    assert sessions.find(s.id) is None  # 330 s: past its lifetime however busy
    assert sessions.find(None) is None and sessions.find("forged") is None


def test_ending_a_user_s_sessions(clock: Clock) -> None:
    sessions = auth.Sessions()
    a, b, c = sessions.start("alice"), sessions.start("alice"), sessions.start("bob")
    sessions.end_all_of("alice")
    assert sessions.find(a.id) is None and sessions.find(b.id) is None and sessions.find(c.id) is c
    assert a.csrf != b.csrf and len(a.id) >= 40


def test_logins_are_limited_per_address_and_per_name(clock: Clock) -> None:
    limiter = auth.LoginLimiter(limit=3, window=100)
    for _ in range(3):
        assert limiter.retry_after("addr:1", "user:alice") == 0
        limiter.failed("addr:1", "user:alice")
    assert limiter.retry_after("addr:2", "user:alice") == pytest.approx(100)  # the name, from anywhere
    assert limiter.retry_after("addr:1", "user:bob") == pytest.approx(100)  # the address, for any name
    assert limiter.retry_after("addr:2", "user:bob") == 0
    limiter.succeeded("user:alice")
    assert limiter.retry_after("addr:2", "user:alice") == 0 and limiter.retry_after("addr:1") > 0
    clock.now += 101
    assert limiter.retry_after("addr:1") == 0


def test_roles_are_ordered() -> None:
    assert allows("admin", "operator") and allows("operator", "viewer") and allows("viewer", "viewer")
    assert not allows("viewer", "operator") and not allows("operator", "admin") and not allows("root", "viewer")


def test_users_and_tokens(tmp_path: Path) -> None:
    home, hasher = Home(tmp_path), Argon2Passwords()
    users.add(home, hasher, "alice", "operator", "a long passphrase")
    with pytest.raises(UserError, match="exists"):
        users.add(home, hasher, "alice", "viewer", "another passphrase")
    assert users.authenticate(home, hasher, "alice", "a long passphrase") is not None
    assert users.authenticate(home, hasher, "alice", "a wrong passphrase") is None
    assert users.authenticate(home, hasher, "nobody", "a long passphrase") is None
    assert users.authenticate(home, hasher, "alice", "x" * 5000) is None  # never hashed at that length
    token = users.create_token(home, "alice", "script")
    assert token.startswith("apl_") and users.user_of_token(home, token).name == "alice"  # type: ignore[union-attr]
    assert users.user_of_token(home, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert users.user_of_token(home, "apl_nonsense") is None and users.user_of_token(home, "") is None
    users.set_role(home, "alice", "viewer")
    assert users.user_of_token(home, token).role == "viewer"  # type: ignore[union-attr]
    users.remove(home, "alice")
    assert users.user_of_token(home, token) is None and users.tokens(home) == []
    stored = "".join(p.read_text() for p in (tmp_path / "web").iterdir())
    assert "a long passphrase" not in stored and token.split("_", 2)[2] not in stored


def test_no_open_redirect_after_login() -> None:
    assert _local("/hosts/web1") == "/hosts/web1"
    assert _local("//evil.example/") == "/" and _local("https://evil.example/") == "/" and _local("/\\evil") == "/"


def test_listen_addresses() -> None:
    assert Listen.parse(":8443") == Listen("0.0.0.0", 8443)
    assert Listen.parse("[::1]:8443") == Listen("::1", 8443)
    assert Listen.parse("appliance.local:443") == Listen("appliance.local", 443)
    for bad in ("8443", "host:", "host:99999", "a b:80", "x;y:80"):
        with pytest.raises(WebError):
            Listen.parse(bad)
