# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance backup`, `points`, `verify`: taking and inspecting recovery points."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from appliance.cli._output import ProgressLine, table
from appliance.cli.context import State, state
from appliance.domain.models import Point
from appliance.domain.models import format_size as size
from appliance.errors import ChainCorruptError
from appliance.services.backup import back_up
from appliance.services.failover import verify_boot
from appliance.services.verify import PointCheck, verify_chain
from appliance.store import catalog, hosts, recovery


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)
    app.command("points")(points)
    app.command("verify")(verify)


def backup(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The protected host")]) -> None:
    """Take one recovery point of every disk of a host, now."""
    st = state(ctx)
    bar = ProgressLine(f"backup {name}")
    try:
        point = back_up(st.home, st.tools, name, progress=bar)
    finally:
        bar.done()
    depth = len(catalog.load(st.home.chain_dir(name), name).points)
    read = sum(d.read_bytes for d in point.disks)
    typer.echo(
        f"{name}: point {point.id} ({point.time_iso}) in {point.seconds:.1f} s: read {size(read)}, "
        f"changed {size(point.changed_bytes)}, sent {size(point.sent_bytes)}, "
        f"on the wire {size(point.wire_bytes)}, depth {depth}"
    )
    c = point.consistency
    if c is not None:
        typer.echo(f"{name}: {c.label}" + (f": {c.detail}" if c.detail else ""), err=not c.consistent)
    if hosts.load(st.home, name).verify_boot:
        _verify_boot(st, name, point.id, 300.0)


def _verified(p: Point) -> str:
    v = p.verification
    text = "-" if v is None else ("ok " if v.ok else "FAILED ") + v.time.strftime("%Y-%m-%d %H:%M")
    boot = p.extra.get("boot")
    if isinstance(boot, dict):
        text += ", boot " + (f"ok {boot.get('rto_seconds')} s" if boot.get("ok") else "FAILED")
    return text


def _point_doc(p: Point, depth: int) -> dict[str, Any]:
    doc = catalog.point_doc(p)
    doc["verified"] = doc.pop("verification")
    return {**doc, "time": p.time_iso, "depth": depth, "changed_bytes": p.changed_bytes, "sent_bytes": p.sent_bytes}


def points(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The protected host")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List a host's recovery points, oldest first."""
    home = state(ctx).home
    hosts.load(home, name)
    chain = catalog.load(home.chain_dir(name), name)
    pins = recovery.pinned_points(home, name)
    if as_json:
        docs = [{**_point_doc(p, i + 1), "pinned": pins.get(p.id)} for i, p in enumerate(chain.points)]
        typer.echo(json.dumps(docs, indent=1))
        return
    rows = [
        [p.id, p.time_iso, size(p.changed_bytes), size(p.sent_bytes), f"{p.seconds:.1f}", str(i + 1),
         p.consistency.label if p.consistency else "-", _verified(p), pins.get(p.id, "")]
        for i, p in enumerate(chain.points)
    ]  # fmt: skip
    headers = ["ID", "TIME", "CHANGED", "SENT", "SECONDS", "DEPTH", "CONSISTENCY", "VERIFIED", "IN USE BY"]
    typer.echo(table(headers, rows))


def _verify_boot(st: State, name: str, point: str, timeout: float) -> None:
    verdict = verify_boot(
        st.home, st.tools, name, point_ref=point, timeout=timeout, say=lambda t: typer.echo(t, err=True)
    )
    rto = f", RTO {verdict['rto_seconds']:.1f} s" if verdict["ok"] else ""
    typer.echo(f"{name}: boot {'ok' if verdict['ok'] else 'FAILED'}{rto}: {verdict['detail']}")
    typer.echo(f"screenshot: {verdict['screenshot'] or '-'}")
    if not verdict["ok"]:
        raise ChainCorruptError(f"a point of {name} did not boot: {verdict['detail']}")


def verify(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The protected host")],
    point: Annotated[str | None, typer.Option("--point", help="Only this point (id or time)")] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Rebuild the newest point's block hash list if damaged")
    ] = False,
    boot: Annotated[bool, typer.Option("--boot", help="Boot the point (default: newest) in isolation")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="With --boot: seconds to wait for the boot")] = 300.0,
) -> None:
    """Check every point: qcow2 metadata, backing chain, content digest; with --boot, that it boots."""
    st = state(ctx)
    if boot:
        _verify_boot(st, name, point or "latest", timeout)
        return

    def show(check: PointCheck) -> None:
        typer.echo(f"{check.point}: {'ok' if check.ok else 'FAILED: ' + check.summary}")

    results = verify_chain(st.home, st.tools, name, point_ref=point, repair=repair, on_point=show)
    bad = [r for r in results if not r.ok]
    if bad:
        raise ChainCorruptError(
            f"{len(bad)} of {len(results)} points of {name} failed verification: " + ", ".join(r.point for r in bad)
        )
    typer.echo(f"{name}: {len(results)} points verified")
