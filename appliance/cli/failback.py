# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance failback HOST --to ... | status HOST`: the recovery VM back onto the repaired server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli._output import HostOrCommand
from appliance.cli.context import state
from appliance.domain.models import HostKey
from appliance.domain.models import format_size as size
from appliance.errors import ConfigError
from appliance.services import failback as service

app = typer.Typer(
    cls=HostOrCommand,
    help="Copy a recovery VM back to the repaired server (failback HOST), follow it (status HOST).",
    no_args_is_help=True,
)


def _ask(key: HostKey) -> bool:
    if not sys.stdin.isatty():
        return False
    typer.echo(f"The target presents a {key.key_type} key with fingerprint {key.fingerprint}.", err=True)
    return typer.confirm("Is this the target's key?", default=False, err=True)


@app.command("run")
def run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The protected host whose recovery VM goes back")],
    to: Annotated[str | None, typer.Option("--to", help="user@address of the repaired server")] = None,
    disk: Annotated[list[str] | None, typer.Option("--disk", help="VM_DISK=TARGET_DISK (/dev/sda=/dev/sda)")] = None,
    cutover: Annotated[str, typer.Option("--cutover", help="auto, manual, or now (cut a manual one over)")] = "auto",
    key: Annotated[Path | None, typer.Option("--key", help="SSH key for the target [default: the host's]")] = None,
    fingerprint: Annotated[str | None, typer.Option("--host-key-fingerprint", help="Pin the target's key")] = None,
    trust_first_use: Annotated[bool, typer.Option("--trust-first-use", help="Pin the key the target presents")] = False,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", help="Seconds before forcing off")] = 120.0,
    full_proof: Annotated[
        bool, typer.Option("--full-proof", help="Prove by reading both whole disks again (a longer downtime)")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write to a target disk even though it is mounted or in use there")
    ] = False,
) -> None:
    """Copy HOST's recovery VM to the target while it runs, cut over with a short downtime, verify."""
    st = state(ctx)
    if cutover == "now":
        service.request_cutover(st.home, name)
        typer.echo(f"{name}: the failback cuts over after its current pass")
        return
    if cutover not in ("auto", "manual"):
        raise ConfigError(f"invalid --cutover {cutover!r}: use auto, manual or now")
    if not to or not disk:
        raise ConfigError("give the target with --to and map every disk with --disk VM_DISK=TARGET_DISK")
    result = service.fail_back(
        st.home, st.tools, name, to=to, mapping=disk, key=key.expanduser() if key else None, fingerprint=fingerprint,
        trust_first_use=trust_first_use, confirm=_ask, cutover=cutover, shutdown_timeout=shutdown_timeout,
        full_proof=full_proof, force=force, say=lambda text: typer.echo(text, err=True),
    )  # fmt: skip
    typer.echo(
        f"{name}: failed back to {result.target}: sent {size(result.bytes_sent)}, downtime "
        f"{result.downtime_seconds:.1f} s, total {result.total_seconds:.1f} s; the VM's final state is now point "
        f"{result.point}"
    )


@app.command("status")
def status(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The protected host")]) -> None:
    """Phase, bytes sent, dirty bytes left, estimated downtime."""
    progress = service.status(state(ctx).home, name)
    if progress is None:
        typer.echo(f"{name}: no failback")
        return
    rows = [
        ("target", progress.target), ("phase", progress.phase), ("passes", str(progress.passes)),
        ("sent", size(progress.bytes_sent)), ("dirty left", size(progress.dirty_bytes)),
        ("estimated downtime", f"{progress.estimated_downtime:.0f} s" if progress.rate else "-"),
        ("downtime", f"{progress.downtime_seconds:.1f} s" if progress.downtime_seconds is not None else "-"),
        ("total", f"{progress.total_seconds:.1f} s" if progress.total_seconds is not None else "-"),
        ("new point", progress.point or "-"), ("error", progress.error or "-"),
    ]  # fmt: skip
    for k, v in rows:
        typer.echo(f"{k + ':':20} {v}")
