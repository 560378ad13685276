# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance alert add|list|remove|test|check|incidents`: who is told when something goes wrong."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli._output import table
from appliance.cli.context import state
from appliance.domain.models import format_age
from appliance.errors import EXIT_WARNING
from appliance.services import alerts

app = typer.Typer(help="Alerts by mail or webhook: a host late or failing, a point that fails its checks, "
                  "the store filling up, a recovery VM stopped, a failback failed, a DR site lagging.",
                  no_args_is_help=True)  # fmt: skip
add_app = typer.Typer(help="Add a channel alerts are sent through.", no_args_is_help=True)
app.add_typer(add_app, name="add")

_NAME = typer.Option("--name", help="The channel's name [default: mail-1, webhook-1, ...]")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="alert")


@add_app.command("mail")
def add_mail(
    ctx: typer.Context,
    smtp: Annotated[str, typer.Option("--smtp", help="The mail server, HOST:PORT (465: TLS from the start)")],
    to: Annotated[list[str], typer.Option("--to", help="A recipient; repeat for more")],
    sender: Annotated[str | None, typer.Option("--from", help="The sender [default: appliance@<hostname>]")] = None,
    starttls: Annotated[bool, typer.Option("--starttls", help="Upgrade the connection with STARTTLS")] = False,
    user: Annotated[str, typer.Option("--user", help="Log in to the server as this user")] = "",
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="A file (chmod 600) whose first line is the password")
    ] = None,
    name: Annotated[str | None, _NAME] = None,
) -> None:
    """Send alerts by mail."""
    channel = alerts.add_mail(state(ctx).home, smtp=smtp, recipients=to, sender=sender, starttls=starttls,
                              user=user, password_file=password_file, name=name)  # fmt: skip
    typer.echo(f"added {channel.name}: {channel.describe()}")


@add_app.command("webhook")
def add_webhook(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", help="The webhook's URL (http or https; kept as a secret)")],
    name: Annotated[str | None, _NAME] = None,
) -> None:
    """Send alerts as a JSON POST (a `text` field Slack, Teams and Matrix hookshot show, plus structured fields)."""
    channel = alerts.add_webhook(state(ctx).home, url=url, name=name)
    typer.echo(f"added {channel.name}: {channel.describe()}")


@app.command("list")
def list_channels(ctx: typer.Context) -> None:
    """The channels (a webhook's URL shown without its path: it holds the hook's token)."""
    rows = [[c.name, c.kind, c.describe()] for c in alerts.channels(state(ctx).home)]
    typer.echo(table(["CHANNEL", "KIND", "WHERE"], rows))


@app.command("remove")
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The channel")]) -> None:
    """Stop sending alerts through a channel (its secret file is removed too)."""
    alerts.remove(state(ctx).home, name)
    typer.echo(f"removed {name}")


@app.command("test")
def test(ctx: typer.Context) -> None:
    """Send one test message through every channel, now; exits non-zero if any channel fails."""
    st = state(ctx)
    results = alerts.test(st.home, st.tools)
    for result in results:
        typer.echo(f"{result.channel}: {'sent' if not result.error else 'FAILED: ' + result.error}",
                   err=bool(result.error))  # fmt: skip
    if any(r.error for r in results):
        raise typer.Exit(EXIT_WARNING)


@app.command("check")
def check(
    ctx: typer.Context,
    retry_now: Annotated[
        bool, typer.Option("--retry-now", help="Try every waiting message now, not at its next try")
    ] = False,
) -> None:
    """Judge every condition now and deliver what is due, once (the daemon does this every minute)."""
    st = state(ctx)
    report = alerts.check(st.home, st.tools)
    for notice in report.notices:
        typer.echo(f"{notice.state}: {notice.incident.text}")
    delivered = alerts.deliver(st.home, st.tools, retry_now=retry_now)
    dropped = f", {delivered.dropped} dropped" if delivered.dropped else ""
    typer.echo(f"{len(report.open)} open incident(s); {delivered.sent} message(s) sent, "
               f"{delivered.waiting} waiting{dropped}")  # fmt: skip
    for channel, why in delivered.failed.items():
        typer.echo(f"{channel}: delivery failed, retried later: {why}", err=True)


@app.command("incidents")
def incidents(ctx: typer.Context) -> None:
    """The incidents open now."""
    st = state(ctx)
    found = alerts.open_incidents(st.home)
    now = datetime.now(UTC)
    rows = [[i.kind, i.subject, format_age((now - i.opened).total_seconds()), i.text] for i in found]
    typer.echo(table(["KIND", "SUBJECT", "OPEN FOR", "WHAT"], rows))
