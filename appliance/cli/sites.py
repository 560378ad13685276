# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance site add|list|grant|remove|export|import`, `appliance replicate`, `appliance serve-replica`:
offsite copies.

The DR appliance pulls from the source: `site add` on the DR appliance, `site grant` on the source (its
key may then run only `serve-replica`), `replicate` on the DR appliance.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli._output import parse_size, table
from appliance.cli.context import state
from appliance.cli.hosts import _ask
from appliance.domain.models import Site, format_duration, parse_duration
from appliance.domain.models import format_size as size
from appliance.domain.schedule import parse_window
from appliance.services import replica_source, seed
from appliance.services.replicate import add_site, grant, lags, replicate
from appliance.store import sites

app = typer.Typer(help="Other appliances: the sites this one replicates from, the sites it grants.",
                  no_args_is_help=True)  # fmt: skip


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="site")
    root.command("replicate")(replicate_cmd)
    root.command("replicas")(replicas_cmd)
    root.command("serve-replica", hidden=True)(serve_replica_cmd)


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A short name for the source site, e.g. hq")],
    address: Annotated[str, typer.Option("--address", help="user@host or user@host:port of the source appliance")],
    key: Annotated[Path, typer.Option("--key", help="The private key the source granted (`site grant` there)")],
    fingerprint: Annotated[
        str | None, typer.Option("--host-key-fingerprint", help="SHA256:... of the source's SSH host key")
    ] = None,
    trust_first_use: Annotated[
        bool, typer.Option("--trust-first-use", help="Pin whatever key the source presents now")
    ] = False,
) -> None:
    """Add a source site this appliance pulls points from (its host key pinned, as for hosts)."""
    st = state(ctx)
    site, listed = add_site(st.home, st.tools, name=name, address=address, port=None, key=key,
                            fingerprint=fingerprint, trust_first_use=trust_first_use, confirm=_ask)  # fmt: skip
    typer.echo(f"pinned host key {site.host_key.fingerprint} ({site.host_key.key_type}) for {site.address}:{site.port}")
    typer.echo(f"added site {name}: {site.target}, {len(listed)} host(s) there: "
               + (", ".join(h.name for h in listed) or "none yet"))  # fmt: skip


@app.command("set")
def set_site(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The site")],
    bandwidth: Annotated[
        str | None, typer.Option("--bandwidth", help="Bytes a second a replication may take, e.g. 20M; 0: no limit")
    ] = None,
    window: Annotated[
        str | None, typer.Option("--window", help="When the daemon may start points, HH:MM-HH:MM local; '': always")
    ] = None,
    every: Annotated[str | None, typer.Option("--every", help="The daemon replicates every 15m, 1h, ...")] = None,
) -> None:
    """Change how and when this appliance replicates from a site."""
    home = state(ctx).home
    site = sites.load(home, name)
    if bandwidth is not None:
        site = replace(site, bandwidth=parse_size(bandwidth) if bandwidth != "0" else 0)
    if window is not None:
        parse_window(window)
        site = replace(site, window=window)
    if every is not None:
        site = replace(site, interval=parse_duration(every))
    sites.save(home, site)
    typer.echo(f"updated site {name}: {_describe(site)}")


def _describe(site: Site) -> str:
    limit = f"{size(site.bandwidth)}/s" if site.bandwidth else "no bandwidth limit"
    when = f"every {format_duration(site.interval)}" if site.interval else "not scheduled"
    return f"{limit}, {when}" + (f" inside {site.window}" if site.window else "")


@app.command("list")
def list_sites(ctx: typer.Context) -> None:
    """The sites this appliance replicates from."""
    home = state(ctx).home
    rows = []
    for name in sites.names(home):
        site = sites.load(home, name)
        rows.append([name, site.target, site.host_key.fingerprint, _describe(site)])
    typer.echo(table(["SITE", "ADDRESS", "HOST KEY", "REPLICATION"], rows))


@app.command("remove")
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The site")]) -> None:
    """Forget a site (the replicated chains stay, as hosts of this appliance)."""
    home = state(ctx).home
    sites.load(home, name)
    sites.remove(home, name)
    typer.echo(f"removed site {name}")


@app.command("grant")
def grant_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The DR site's name, e.g. dr1")],
    key: Annotated[Path, typer.Option("--key", help="The DR appliance's public key (.pub)")],
    authorized_keys: Annotated[
        Path, typer.Option("--authorized-keys", help="The file sshd reads [default: ~/.ssh/authorized_keys]")
    ] = Path("~/.ssh/authorized_keys"),
) -> None:
    """On the source: let a DR site's key run only `serve-replica` (list and read points; nothing else)."""
    home = state(ctx).home
    command = [sys.executable, "-m", "appliance", "--home", str(home.root), "serve-replica", "--site", name]
    line = grant(home, name, key, authorized_keys.expanduser(), command)
    typer.echo(f"granted site {name} read-only replication in {authorized_keys}:\n  {line}")


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(help="The host")],
    folder: Annotated[Path, typer.Argument(help="A folder on the disk that travels: the export goes in FOLDER/HOST")],
    force: Annotated[bool, typer.Option("--force", help="Replace an export of the host already there")] = False,
) -> None:
    """On the source: write a host's newest point as plain files, to seed a DR site by disk."""
    st = state(ctx)
    done = seed.export_host(st.home, st.tools, host, folder, force=force)
    typer.echo(f"exported {host}'s point {done.point} to {done.folder} ({size(done.bytes)}); "
               f"at the DR site: appliance site import {folder}")  # fmt: skip


@app.command("import")
def import_cmd(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="The folder `site export` wrote into (or one host's folder in it)")],
    site: Annotated[
        str | None, typer.Option("--site", help="The site the hosts are replicated from [default: the only one]")
    ] = None,
) -> None:
    """On the DR site: adopt exported points as the first points of replicated hosts (checked, then proven)."""
    st = state(ctx)
    for done in seed.import_seeds(st.home, st.tools, folder, site, say=lambda t: typer.echo(t, err=True)):
        typer.echo(f"{done.host}: point {done.point.id} adopted as a replica of site {done.site}; "
                   f"`appliance replicate {done.site} {done.host}` pulls what changed since")  # fmt: skip


def replicate_cmd(
    ctx: typer.Context,
    site: Annotated[str, typer.Argument(help="The source site")],
    host: Annotated[str | None, typer.Argument(help="Only this host [default: every host of the site]")] = None,
) -> None:
    """Pull every point of the site's hosts that this appliance does not hold yet, oldest first."""
    st = state(ctx)
    for report in replicate(st.home, st.tools, site, host, say=lambda t: typer.echo(t, err=True)):
        pulled = sum(p.wire_bytes for p in report.pulled)
        skipped = f" ({len(report.skipped)} skipped: merged away there, or their hashes no longer kept)"
        typer.echo(f"{report.host}: {len(report.pulled)} point(s) pulled from {site}, {pulled} bytes on the wire"
                   f"{skipped if report.skipped else ''}; newest there {report.newest_there or '-'}, "
                   f"here {report.newest_here or '-'}")  # fmt: skip


def serve_replica_cmd(
    ctx: typer.Context,
    site: Annotated[str, typer.Option("--site", help="The DR site this key was granted to")] = "?",
) -> None:
    """The forced command of a granted key: answer a DR site on stdin and stdout."""
    st = state(ctx)
    code = replica_source.serve(st.home, st.tools, sys.stdin.buffer, sys.stdout.buffer, site)
    raise typer.Exit(code)


def replicas_cmd(ctx: typer.Context) -> None:
    """Per host of every site: the newest point there and here, and how far behind this appliance is."""
    st = state(ctx)
    rows = []
    for lag in lags(st.home, st.tools):
        behind = "-" if lag.seconds == float("inf") else _behind(lag.seconds)
        last = lag.last_run
        ran = (
            "-"
            if last is None
            else f"{last.started.astimezone():%Y-%m-%d %H:%M} " + ("ok" if last.ok else f"FAILED: {last.message}")
        )
        if lag.error:
            ran = f"UNREACHABLE: {lag.error}"
        rows.append([lag.host, lag.site, lag.newest_there.id if lag.newest_there else "-",
                     lag.newest_here.id if lag.newest_here else "-", str(lag.missing), behind, ran])  # fmt: skip
    typer.echo(table(["HOST", "SITE", "NEWEST THERE", "NEWEST HERE", "MISSING", "LAG", "DAEMON'S LAST RUN"], rows))


def _behind(seconds: float) -> str:
    if seconds < 60:
        return "0" if seconds == 0 else f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
