# SPDX-License-Identifier: GPL-2.0-or-later
"""Who is asking: sessions (the pages), tokens (scripts), and the limits on guessing a password.

A session is a random id in an HttpOnly, SameSite=Strict cookie (Secure over TLS); the server keeps what
it means (user, CSRF token, when it ends). It ends after `idle` seconds without a request, after `lifetime`
in any case, at logout, and when its user is removed; the user's role is read again on every request, so
a role taken away applies at once. A request that changes something with a session cookie must carry the
session's CSRF token (a form field or the X-CSRF-Token header); a token in the Authorization header is
no ambient credential, so a script's request needs none.

Failed logins are counted per client address and per user name: past LIMIT failures within WINDOW
seconds, that address or name is refused (429) until the window has passed, and every failure takes
FAIL_DELAY seconds before it is answered.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

LIMIT = 5
WINDOW = 300.0
FAIL_DELAY = 1.0
COOKIE = "appliance_session"


@dataclass(slots=True)
class Session:
    id: str
    user: str
    csrf: str
    created: float
    seen: float


@dataclass(slots=True)
class Sessions:
    idle: float = 1800.0
    lifetime: float = 12 * 3600.0
    _by_id: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, user: str) -> Session:
        now = time.monotonic()
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._drop_ended(now)
            self._by_id[session.id] = session
        return session

    def find(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle clock restarted), or None: unknown, or it has ended."""
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None:
                return None
            if self._ended(session, now):
                del self._by_id[session_id]
                return None
            session.seen = now
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._by_id.pop(session_id, None)

    def end_all_of(self, user: str) -> None:
        with self._lock:
            for sid in [s.id for s in self._by_id.values() if s.user == user]:
                del self._by_id[sid]

    def _ended(self, session: Session, now: float) -> bool:
        return now - session.seen > self.idle or now - session.created > self.lifetime

    def _drop_ended(self, now: float) -> None:
        for sid in [s.id for s in self._by_id.values() if self._ended(s, now)]:
            del self._by_id[sid]


@dataclass(slots=True)
class LoginLimiter:
    limit: int = LIMIT
    window: float = WINDOW
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login may be tried for these keys (client address, user name); 0: now."""
        now = time.monotonic()
        with self._lock:
            waits = [self._wait(key, now) for key in keys]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user_key: str) -> None:
        """A good password clears its name's count (not the address's: one account may not unlock guessing)."""
        with self._lock:
            self._failures.pop(user_key, None)

    def _wait(self, key: str, now: float) -> float:
        times = self._failures.get(key)
        if not times:
            return 0.0
        while times and now - times[0] > self.window:
            times.popleft()
        if len(times) < self.limit:
            return 0.0
        return self.window - (now - times[-self.limit])
