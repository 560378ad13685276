# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance consolidate [HOST] [--dry-run]`: apply retention by merging points."""

from __future__ import annotations

from typing import Annotated

import typer

from appliance.cli._output import table
from appliance.cli.context import state
from appliance.domain.retention import DROP
from appliance.errors import ApplianceError, ChainError
from appliance.services.consolidate import Report, consolidate
from appliance.store import hosts


def register(app: typer.Typer) -> None:
    app.command("consolidate")(consolidate_cmd)


def consolidate_cmd(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="The protected host [default: all]")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan: each point kept or merged, and why")
    ] = False,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for a busy host")] = 0.0,
) -> None:
    """Apply each host's retention policy: points no rule keeps are merged into the next newer point."""
    st = state(ctx)
    names = [name] if name else hosts.names(st.home)
    failed = []
    for host in names:
        try:
            report = consolidate(st.home, st.tools, host, dry_run=dry_run, wait=wait)
        except ApplianceError as exc:
            if name:
                raise
            failed.append(f"{host}: {exc.message}")  # the other hosts are consolidated all the same
            continue
        _show(report, dry_run)
    if failed:
        raise ChainError(f"consolidation failed for {'; '.join(failed)}")


def _show(report: Report, dry_run: bool) -> None:
    verb = {"keep": "keep", "drop": "merge" if dry_run else "merged", "defer": "deferred"}
    rows = [[d.point, verb[d.action], "; ".join(d.reasons)] for d in report.decisions]
    typer.echo(f"{report.host}: {report.policy}")
    typer.echo(table(["POINT", "ACTION", "WHY"], rows))
    drops = sum(1 for d in report.decisions if d.action == DROP)
    if dry_run:
        typer.echo(f"{report.host}: {drops} points would be merged, {len(report.deferred)} deferred (dry run)")
    else:
        typer.echo(f"{report.host}: merged {len(report.merged)} points in {report.seconds:.1f} s, "
                   f"{len(report.deferred)} deferred")  # fmt: skip
