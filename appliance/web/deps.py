# SPDX-License-Identifier: GPL-2.0-or-later
"""What every route of the console depends on: the Console it is given, who a request comes from and the
role it needs (FastAPI dependencies), and the HTTP status an appliance error answers with.

These live apart from `app` so the console's modules import one way: `app` gathers the routers (`api`,
`pages`, `metrics`, `vnc`), the routers take their dependencies from here, and this module stands only on
`auth` and the services. No router imports `app`, and `app` imports its routers at the top.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import time as time_of_day
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.requests import HTTPConnection

from appliance.domain.users import OPERATOR, VIEWER, allows
from appliance.errors import (
    ApplianceError,
    ChainLockedError,
    ConfigError,
    FailoverError,
    HostNotFoundError,
    PointNotFoundError,
    UserError,
)
from appliance.ports import PasswordHasher, Tools
from appliance.services import users
from appliance.services.console_jobs import ConsoleJobs
from appliance.store.layout import Home
from appliance.web.auth import COOKIE, LoginLimiter, Session, Sessions


@dataclass(slots=True)
class Console:
    """What every request handler is given: the appliance's home and tools, and the console's own state."""

    home: Home
    tools: Tools
    passwords: PasswordHasher
    consolidate_at: time_of_day
    secure_cookies: bool = True
    sessions: Sessions = field(default_factory=Sessions)
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    scheduled: Callable[[], list[str]] = list  # the hosts (sites, stores) the daemon's scheduler runs a job for
    jobs: ConsoleJobs = field(init=False)  # what the console's buttons started

    def __post_init__(self) -> None:
        self.jobs = ConsoleJobs(self.home, self.tools)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from; `session` is None for an API token (no cookie, so no CSRF check)."""

    user: str
    role: str
    session: Session | None


def console_of(request: HTTPConnection) -> Console:
    """The Console the app was created with (kept on the app's state, so a route needs no global)."""
    console = request.app.state.console
    assert isinstance(console, Console)
    return console


def principal_of(request: HTTPConnection) -> Principal | None:
    """The user behind a request (token first, then session cookie), their role read afresh; None if none."""
    console = console_of(request)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, presented = header.partition(" ")
        user = users.user_of_token(console.home, presented.strip()) if scheme.lower() == "bearer" else None
        return Principal(user.name, user.role, None) if user else None
    session = console.sessions.find(request.cookies.get(COOKIE))
    if session is None:
        return None
    found = users.named(console.home, session.user)
    if found is None:  # removed since: the session ends with its user
        console.sessions.end(session.id)
        return None
    return Principal(found.name, found.role, session)


class NotLoggedIn(Exception):
    """A page asked for without a session: the login page instead."""


async def _csrf_ok(request: Request, who: Principal) -> bool:
    if who.session is None or request.method in ("GET", "HEAD", "OPTIONS"):
        return True
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = str((await request.form()).get("csrf", ""))
    return bool(sent) and sent == who.session.csrf


def need(role: str, *, page: bool = False) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the request's principal, who must hold `role` (401/403 otherwise, or the login page)."""

    async def check(request: Request) -> Principal:
        who = principal_of(request)
        if who is None:
            if page:
                raise NotLoggedIn()
            raise HTTPException(401, "log in or send an API token (Authorization: Bearer ...)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not allows(who.role, role):
            raise HTTPException(403, f"{who.user} is a {who.role}; this needs an {role} or more")
        if not await _csrf_ok(request, who):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page")
        return who

    return check


Viewer = Annotated[Principal, Depends(need(VIEWER))]
Operator = Annotated[Principal, Depends(need(OPERATOR))]
PageViewer = Annotated[Principal, Depends(need(VIEWER, page=True))]
PageOperator = Annotated[Principal, Depends(need(OPERATOR, page=True))]

_STATUS = {HostNotFoundError: 404, PointNotFoundError: 404, ConfigError: 400, UserError: 400, ChainLockedError: 409,
           FailoverError: 409}  # fmt: skip


def status_of(exc: ApplianceError) -> int:
    """The HTTP status an appliance error answers with, for the API's JSON and a button's message alike."""
    for kind, code in _STATUS.items():
        if isinstance(exc, kind):
            return code
    return 500
