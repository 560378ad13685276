# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance web`: the web console, its JSON API and /metrics, over TLS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance import bootstrap
from appliance.cli.context import state
from appliance.domain.models import parse_duration
from appliance.domain.schedule import parse_time_of_day
from appliance.log import get_logger

if TYPE_CHECKING:
    import uvicorn

log = get_logger(__name__)

LISTEN = typer.Option("--listen", help="HOST:PORT to serve on (:8443 = every address)")
CERT = typer.Option("--cert", help="TLS certificate (PEM) [default: a self-signed one, made on the first start]")
KEY = typer.Option("--key", help="Its private key (PEM)")
SESSION = typer.Option("--session-timeout", help="A session ends after this long without a request (e.g. 30m)")


def register(app: typer.Typer) -> None:
    app.command("web")(web)


def prepare(ctx: typer.Context, listen: str, cert: Path | None, key: Path | None, consolidate_at: str,
            session_timeout: str, scheduled: Callable[[], list[str]] | None = None) -> uvicorn.Server:  # fmt: skip
    """The console's server, ready to run (`web`) or to be run beside the scheduler (`daemon --web`, whose
    running jobs it then shows). Its imports wait until a console is asked for: FastAPI and uvicorn would
    add a third of a second to every other command's start."""
    from appliance.web.app import Console
    from appliance.web.auth import Sessions
    from appliance.web.server import Listen, make_server, tls_files

    st = state(ctx)
    console = Console(st.home, st.tools, bootstrap.passwords(), parse_time_of_day(consolidate_at),
                      sessions=Sessions(idle=parse_duration(session_timeout)))  # fmt: skip
    if scheduled is not None:
        console.scheduled = scheduled
    where = Listen.parse(listen)
    cert_file, key_file = tls_files(console, where, cert, key)
    server = make_server(console, where, cert_file, key_file)
    log.info("web.started", listen=f"{where.host}:{where.port}", cert=str(cert_file))
    typer.echo(f"console at https://{where.host}:{where.port}/ (certificate {cert_file})", err=True)
    return server


def web(
    ctx: typer.Context,
    listen: Annotated[str, LISTEN] = "0.0.0.0:8443",
    cert: Annotated[Path | None, CERT] = None,
    key: Annotated[Path | None, KEY] = None,
    session_timeout: Annotated[str, SESSION] = "30m",
    consolidate_at: Annotated[str, typer.Option("--consolidate-at", help="The daemon's, for the queue")] = "02:00",
) -> None:
    """Serve the web console (pages, /api/v1 with its OpenAPI docs at /api/docs, /metrics) until stopped."""
    prepare(ctx, listen, cert, key, consolidate_at, session_timeout).run()
    log.info("web.stopped")
