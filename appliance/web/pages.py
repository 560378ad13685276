# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's pages: Jinja2 templates over the same services as the API, kept live by htmx polling
a fragment of each page every few seconds. Buttons post with the session's CSRF token (htmx sends it as
a header); what they start shows on the page at its next refresh."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from appliance.domain.models import format_age, format_size
from appliance.errors import ApplianceError
from appliance.log import get_logger
from appliance.services import alerts, status, users
from appliance.web.auth import COOKIE, FAIL_DELAY
from appliance.web.deps import PageOperator, PageViewer, Principal, console_of, status_of

log = get_logger(__name__)
router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(resources.files("appliance") / "web" / "templates"))
REFRESH = 3  # seconds between a page's refreshes


def _when(moment: datetime | None) -> str:
    return f"{moment.astimezone():%Y-%m-%d %H:%M:%S}" if moment else "-"


templates.env.filters.update(age=lambda s: "-" if s is None else format_age(s), size=format_size, when=_when)


def _page(request: Request, name: str, who: Principal | None, status_code: int = 200, **values: Any) -> HTMLResponse:
    context = {"who": who, "csrf": who.session.csrf if who and who.session else "", "refresh": REFRESH,
               "now": datetime.now(UTC), **values}  # fmt: skip
    return templates.TemplateResponse(request, name, context, status_code=status_code)


# -- logging in and out ---------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002
    return _page(request, "login.html", None, next=_local(next), error="")


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, user: str = Form(..., max_length=64), password: str = Form(..., max_length=1024),
                next: str = Form("/")) -> Response:  # noqa: A002  # fmt: skip
    c = console_of(request)
    address = request.client.host if request.client else "?"
    keys = (f"addr:{address}", f"user:{user}")
    wait = c.limiter.retry_after(*keys)
    if wait > 0:
        log.warning("console.login_limited", user=user, address=address)
        return _page(request, "login.html", None, next=_local(next), status_code=429,
                     error=f"too many failed logins: try again in {int(wait) + 1} s")  # fmt: skip
    found = await asyncio.to_thread(users.authenticate, c.home, c.passwords, user, password)
    if found is None:
        c.limiter.failed(*keys)
        log.warning("console.login_failed", user=user, address=address)
        await asyncio.sleep(FAIL_DELAY)
        return _page(request, "login.html", None, next=_local(next), status_code=401,
                     error="wrong user name or password")  # fmt: skip
    c.limiter.succeeded(keys[1])
    session = c.sessions.start(found.name)
    log.info("console.login", user=found.name, address=address)
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(COOKIE, session.id, httponly=True, samesite="strict", secure=c.secure_cookies, path="/")
    return response


@router.post("/logout")
def logout(request: Request, who: PageViewer) -> Response:
    if who.session is not None:
        console_of(request).sessions.end(who.session.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def _local(target: str) -> str:
    """Only a path on this console (never //elsewhere or https://elsewhere): no open redirect."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


# -- the pages and their live parts -----------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request, who: PageViewer) -> HTMLResponse:
    return _page(request, "overview.html", who, **_overview(request))


@router.get("/parts/overview", response_class=HTMLResponse)
def overview_part(request: Request, who: PageViewer) -> HTMLResponse:
    return _page(request, "_overview.html", who, **_overview(request))


def _overview(request: Request) -> dict[str, Any]:
    c = console_of(request)
    return {"view": status.overview(c.home, c.tools), "incidents": alerts.open_incidents(c.home)}


@router.get("/hosts/{name}", response_class=HTMLResponse)
def host_page(request: Request, name: str, who: PageViewer) -> HTMLResponse:
    return _page(request, "host.html", who, detail=status.host_detail(console_of(request).home, name))


@router.get("/parts/hosts/{name}", response_class=HTMLResponse)
def host_part(request: Request, name: str, who: PageViewer) -> HTMLResponse:
    c = console_of(request)
    busy = [r for r in c.jobs.running() if r.host == name]
    return _page(request, "_host.html", who, detail=status.host_detail(c.home, name), busy=busy)


@router.get("/vms", response_class=HTMLResponse)
def vms_page(request: Request, who: PageViewer) -> HTMLResponse:
    c = console_of(request)
    return _page(request, "vms.html", who, vms=status.vm_statuses(c.home, c.tools))


@router.get("/parts/vms", response_class=HTMLResponse)
def vms_part(request: Request, who: PageViewer) -> HTMLResponse:
    c = console_of(request)
    return _page(request, "_vms.html", who, vms=status.vm_statuses(c.home, c.tools))


@router.get("/vms/{name}/console", response_class=HTMLResponse)
def console_page(request: Request, name: str, who: PageOperator) -> HTMLResponse:
    """noVNC in the page, connected through the console's own WebSocket proxy (operators only)."""
    c = console_of(request)
    vm = next((v for v in status.vm_statuses(c.home, c.tools) if v.host == name and v.purpose == "failover"), None)
    if vm is None:
        return _page(request, "message.html", who, title="No recovery VM", text=f"{name} has no recovery VM")
    return _page(request, "console.html", who, vm=vm)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, who: PageViewer) -> HTMLResponse:
    return _page(request, "jobs.html", who, jobs=_jobs(request))


@router.get("/parts/jobs", response_class=HTMLResponse)
def jobs_part(request: Request, who: PageViewer) -> HTMLResponse:
    return _page(request, "_jobs.html", who, jobs=_jobs(request))


def _jobs(request: Request) -> dict[str, Any]:
    c = console_of(request)
    found = status.jobs(c.home, c.consolidate_at)
    return {"upcoming": found.upcoming[:50], "running": c.jobs.running(), "scheduled": c.scheduled(),
            "history": found.history[::-1][:200]}  # fmt: skip


# -- buttons (operators) ------------------------------------------------------------------------------------


@router.post("/hosts/{name}/backup", response_class=HTMLResponse)
def backup_button(request: Request, name: str, who: PageOperator) -> HTMLResponse:
    return _pressed(request, lambda: console_of(request).jobs.back_up(name, who.user), "backup started")


@router.post("/hosts/{name}/verify-boot", response_class=HTMLResponse)
def verify_boot_button(request: Request, name: str, who: PageOperator,
                       point: str = Form("latest", max_length=64)) -> HTMLResponse:  # fmt: skip
    return _pressed(request, lambda: console_of(request).jobs.verify_boot(name, point, who.user),
                    f"boot verification of {point} started")  # fmt: skip


@router.post("/hosts/{name}/failover", response_class=HTMLResponse)
def failover_button(request: Request, name: str, who: PageOperator, point: str = Form(..., max_length=64)
                    ) -> HTMLResponse:  # fmt: skip
    return _pressed(request, lambda: console_of(request).jobs.fail_over(name, point, who.user),
                    f"failover to {point} started: see Recovery VMs")  # fmt: skip


@router.post("/vms/{name}/stop", response_class=HTMLResponse)
def stop_button(request: Request, name: str, who: PageOperator, keep: bool = Form(True)) -> HTMLResponse:
    return _pressed(request, lambda: console_of(request).jobs.stop_vm(name, keep, who.user), "stopping")


@router.post("/failbacks/{name}/cutover", response_class=HTMLResponse)
def cutover_button(request: Request, name: str, who: PageOperator) -> HTMLResponse:
    return _pressed(request, lambda: console_of(request).jobs.cutover(name, who.user),
                    "cutover requested: it happens after the current pass")  # fmt: skip


def _pressed(request: Request, press: Any, done: str) -> HTMLResponse:
    """A button's answer: one line for the page's message area (an error in red)."""
    try:
        press()
    except ApplianceError as exc:
        return _page(request, "_flash.html", None, ok=False, text=exc.message, status_code=status_of(exc))
    return _page(request, "_flash.html", None, ok=True, text=done)
