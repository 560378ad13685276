# SPDX-License-Identifier: GPL-2.0-or-later
"""The web console's application: one FastAPI app serving the pages, the JSON API (/api/v1, documented at
/api/docs from its OpenAPI schema), the Prometheus metrics and the recovery VMs' consoles.

Every answer comes from the services the CLI uses; the console keeps no state of its own but its sessions.
Every route needs a logged-in user or an API token, except the login page and the static files.
This module only assembles: the routers' dependencies (the Console, who is asking) are in `deps`, which the
routers import, so nothing imports back from here.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError
from appliance.log import get_logger
from appliance.web import api, metrics, pages, vnc
from appliance.web.deps import Console, NotLoggedIn, status_of

# The console's entry: the CLI builds a Console and serves the app created over it.
__all__ = ["Console", "create_app"]

log = get_logger(__name__)
NOVNC = "/usr/share/novnc"  # Debian's novnc package


def create_app(console: Console) -> FastAPI:
    """The console's app: its routers, static files, error answers and security headers, over `console`."""
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
    async def to_login(request: Request, exc: NotLoggedIn) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={target}", status_code=303)
