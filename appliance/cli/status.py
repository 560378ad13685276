# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance status`: every host's protection at a glance, as the console's overview shows it."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from appliance.cli._output import table
from appliance.cli.context import state
from appliance.domain.models import format_age, format_size
from appliance.services import alerts, status


def register(app: typer.Typer) -> None:
    app.command("status")(show_status)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_age(seconds)


def show_status(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False
) -> None:
    """Each host: protected, late, failing or never backed up; its newest point against its RPO; the store."""
    st = state(ctx)
    view = status.overview(st.home, st.tools)
    incidents = alerts.open_incidents(st.home)
    if as_json:
        doc = {**asdict(view), "alerts": [asdict(i) for i in incidents]}
        typer.echo(json.dumps(doc, indent=1, default=str))
        return
    rows = [[h.name, h.state.upper() if h.state in ("late", "failing") else h.state, h.newest or "-",
             f"{_age(h.age_seconds)}/{_age(h.late_after) if h.late_after else '-'}", h.verification,
             (f"{h.boot.point} {'ok' if h.boot.ok else 'FAILED'}" if h.boot else "-"), h.last_error or ""]
            for h in view.hosts]  # fmt: skip
    typer.echo(table(["HOST", "STATE", "NEWEST", "AGE/RPO", "VERIFIED", "BOOT CHECK", "LAST ERROR"], rows))
    store = view.store
    trend = f", full in {store.days_until_full:.0f} days" if store.days_until_full is not None else ""
    typer.echo(f"\nstore: {format_size(store.used)} of {format_size(store.total)} used ({store.percent} %){trend}")
    for incident in incidents:
        typer.echo(f"ALERT since {incident.opened:%Y-%m-%d %H:%M}: {incident.text}")
