# SPDX-License-Identifier: GPL-2.0-or-later
"""/api/v1: the JSON API the pages and scripts share (OpenAPI at /api/openapi.json, browsable at /api/docs).

Reading needs a viewer; pressing a button an operator. A token (Authorization: Bearer ...) or a session
cookie (with its CSRF token on a POST) authenticates. Errors are {"error": one line, "hint": ...} with
400 (malformed), 401, 403, 404, 409 (busy: the host has a job under way) or 500.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from appliance.domain.alerts import Incident
from appliance.errors import PointNotFoundError
from appliance.services import alerts, status
from appliance.services.console_jobs import Running
from appliance.store import journal
from appliance.web.deps import Operator, Viewer, console_of

router = APIRouter(prefix="/api/v1", tags=["api"])


class VerifyBoot(BaseModel):
    point: str = Field("latest", description="Point id, its ISO time, or latest", max_length=64)


class Failover(BaseModel):
    point: str = Field(..., description="Point id to boot", max_length=64)
    confirm: str = Field(..., description="The same point id again: a failover is never started by a slip",
                         max_length=64)  # fmt: skip


class StopVm(BaseModel):
    keep: bool = Field(True, description="Keep the VM's writes (for a failback or a resume)")


class Started(BaseModel):
    kind: str
    host: str
    user: str
    started: datetime


def _started(job: Running) -> JSONResponse:
    return JSONResponse(Started(kind=job.kind, host=job.host, user=job.user, started=job.started).model_dump(
        mode="json"), status_code=202)  # fmt: skip


@router.get("/overview", response_model=status.Overview)
def overview(request: Request, who: Viewer) -> status.Overview:
    """Every host's protection, the store's usage and the recovery VMs."""
    c = console_of(request)
    return status.overview(c.home, c.tools)


@router.get("/hosts", response_model=list[status.HostStatus])
def hosts(request: Request, who: Viewer) -> list[status.HostStatus]:
    c = console_of(request)
    return status.overview(c.home, c.tools, with_vms=False).hosts


@router.get("/hosts/{name}", response_model=status.HostDetail)
def host(request: Request, name: str, who: Viewer) -> status.HostDetail:
    """One host: its state, its points (verification, boot checks, pins), its recent jobs and errors."""
    return status.host_detail(console_of(request).home, name)


@router.get("/hosts/{name}/points/{point}/screenshot", response_class=FileResponse)
def screenshot(request: Request, name: str, point: str, who: Viewer) -> FileResponse:
    """The screen of the point's last boot verification (PNG)."""
    path = status.screenshot(console_of(request).home, name, point)
    if path is None:
        raise PointNotFoundError(f"point {point} of {name} has no boot screenshot")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.post("/hosts/{name}/backup", status_code=202, response_model=Started)
def backup(request: Request, name: str, who: Operator) -> JSONResponse:
    """Back the host up now (then verify the new point, as the scheduler does)."""
    return _started(console_of(request).jobs.back_up(name, who.user))


@router.post("/hosts/{name}/verify-boot", status_code=202, response_model=Started)
def verify_boot(request: Request, name: str, body: VerifyBoot, who: Operator) -> JSONResponse:
    """Boot a point in isolation, take a screenshot, record the verdict."""
    return _started(console_of(request).jobs.verify_boot(name, body.point, who.user))


@router.post("/hosts/{name}/failover", status_code=202, response_model=Started)
def failover(request: Request, name: str, body: Failover, who: Operator) -> JSONResponse:
    """Boot a point as the host's recovery VM (`confirm` must repeat the point's id)."""
    if body.confirm != body.point:
        return JSONResponse({"error": "confirm must repeat the point's id"}, status_code=400)
    return _started(console_of(request).jobs.fail_over(name, body.point, who.user))


@router.get("/vms", response_model=list[status.VmStatus])
def vms(request: Request, who: Viewer) -> list[status.VmStatus]:
    """Recovery VMs with their RTO, state and failback progress."""
    c = console_of(request)
    return status.vm_statuses(c.home, c.tools)


@router.post("/vms/{name}/stop", status_code=202, response_model=Started)
def stop_vm(request: Request, name: str, body: StopVm, who: Operator) -> JSONResponse:
    return _started(console_of(request).jobs.stop_vm(name, body.keep, who.user))


@router.post("/failbacks/{name}/cutover", status_code=202)
def cutover(request: Request, name: str, who: Operator) -> dict[str, str]:
    """Cut the running failback over after its current pass."""
    console_of(request).jobs.cutover(name, who.user)
    return {"host": name, "cutover": "requested"}


class JobsView(BaseModel):
    upcoming: list[tuple[str, str, datetime]]
    running: list[Started]  # the console's
    scheduled: list[str]  # hosts, sites or stores the daemon runs a job for now (when the console runs in it)
    history: list[journal.Entry]


@router.get("/jobs", response_model=JobsView)
def jobs(request: Request, who: Viewer) -> JobsView:
    """The scheduler's queue, the console's jobs under way, and the history of finished jobs."""
    c = console_of(request)
    found = status.jobs(c.home, c.consolidate_at, datetime.now(UTC))
    running = [Started(kind=r.kind, host=r.host, user=r.user, started=r.started) for r in c.jobs.running()]
    return JobsView(upcoming=found.upcoming, running=running, scheduled=c.scheduled(), history=found.history[::-1])


@router.get("/alerts", response_model=list[Incident])
def incidents(request: Request, who: Viewer) -> list[Incident]:
    """The open incidents (what the alerts told and will remind of daily until resolved)."""
    return alerts.open_incidents(console_of(request).home)


@router.get("/me")
def me(who: Viewer) -> dict[str, str]:
    return {"user": who.user, "role": who.role}
