# SPDX-License-Identifier: GPL-2.0-or-later
"""The web console's application: one FastAPI app serving the pages, the JSON API (/api/v1, documented at
/api/docs from its OpenAPI schema), the Prometheus metrics and the recovery VMs' consoles.

Every answer comes from the services the CLI uses; the console keeps no state of its own but its sessions.
Every route needs a logged-in user or an API token, except the login page and the static files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import time as time_of_day
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
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
from appliance.log import get_logger
from appliance.ports import PasswordHasher, Tools
from appliance.services import users
from appliance.services.console_jobs import ConsoleJobs
from appliance.store.layout import Home
from appliance.web.auth import COOKIE, LoginLimiter, Session, Sessions

log = get_logger(__name__)
NOVNC = "/usr/share/novnc"  # Debian's novnc package


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


def need(role: str, *, page: bool = False):  # type: ignore[no-untyped-def]
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
    for kind, code in _STATUS.items():
        if isinstance(exc, kind):
            return code
    return 500


def create_app(console: Console) -> FastAPI:
    from appliance.web import api, metrics, pages, vnc

    app = FastAPI(title="Instant-recovery appliance", version="1", docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")  # fmt: skip
    app.state.console = console
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(metrics.router)
    app.include_router(vnc.router)
    app.mount("/static", StaticFiles(directory=str(resources.files("appliance") / "web" / "static")), "static")
    app.mount("/novnc", StaticFiles(directory=NOVNC, check_dir=False), "novnc")
    _errors(app)
    _headers(app)
    return app


# Scripts only from the console itself (htmx, noVNC, no inline script), never inside another site's frame
# (a button pressed through a transparent frame), nothing cached that a later user of the browser could read.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _headers(app: FastAPI) -> None:
    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith(("/static/", "/novnc/")) and "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApplianceError)
    async def appliance_error(request: Request, exc: ApplianceError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"malformed request: {where or 'body'}: {first.get('msg', 'invalid')}"},
                            status_code=400)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, exc: NotLoggedIn):  # type: ignore[no-untyped-def]
        from fastapi.responses import RedirectResponse

        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={target}", status_code=303)
