# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance failover HOST | status | stop HOST`: recovery points running as VMs."""

from __future__ import annotations

from typing import Annotated

import typer

from appliance.cli._output import HostOrCommand, raise_unreadable, table
from appliance.cli.context import state
from appliance.domain.recovery import BootCheck
from appliance.services import failover as service
from appliance.store import hosts, recovery

app = typer.Typer(
    cls=HostOrCommand,
    help="Boot a recovery point as a VM (failover HOST), list them (status), stop one (stop HOST).",
    no_args_is_help=True,
)


@app.command("boot")
def boot(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The protected host")],
    point: Annotated[str, typer.Option("--point", help="Point id or time [default: the newest]")] = "latest",
    memory: Annotated[int | None, typer.Option("--memory", help="MiB [default: the host's, 1024]")] = None,
    cpus: Annotated[int | None, typer.Option("--cpus")] = None,
    network: Annotated[str | None, typer.Option("--network", help="user, none or bridge=NAME")] = None,
    disk_bus: Annotated[str | None, typer.Option("--disk-bus", help="virtio, sata or ide")] = None,
    boot_check: Annotated[str | None, typer.Option("--boot-check", help="console:REGEX, screen or tcp:PORT")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the guest to boot")] = 300.0,
    accel: Annotated[str, typer.Option("--accel", help="auto, kvm or tcg")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Boot a point even if it failed verification")] = False,
    from_store: Annotated[
        str | None, typer.Option("--from", help="A cloud store: boot its point, fetching blocks as they are read")
    ] = None,
) -> None:
    """Boot a recovery point of HOST as a VM on a disposable overlay, now."""
    st = state(ctx)
    say = lambda text: typer.echo(text, err=True)  # noqa: E731
    if from_store is not None:
        vm = service.fail_over_from_cloud(st.home, st.tools, name, from_store,
                                          point_id=None if point == "latest" else point, timeout=timeout,
                                          boot_check=BootCheck.parse(boot_check) if boot_check else None,
                                          accel=accel, say=say)  # fmt: skip
        host = hosts.load(st.home, name)
        check = BootCheck.parse(boot_check) if boot_check else BootCheck.parse(host.boot_check)
    else:
        host = hosts.load(st.home, name)
        settings = service.settings_for(host, memory=memory, cpus=cpus, network=network, disk_bus=disk_bus)
        check = BootCheck.parse(boot_check) if boot_check else BootCheck.parse(host.boot_check)
        vm = service.fail_over(
            st.home, st.tools, name, point_ref=point, settings=settings, boot_check=check, timeout=timeout,
            accel=accel, force=force, say=say,
        )  # fmt: skip
    typer.echo(f"{vm.name} is running point {vm.point} of {name} ({vm.accel.upper()})")
    if check.kind == "console":
        typer.echo(f"console: {service.find_console_line(vm.console_log, check.pattern)}")
    typer.echo(f"console log: {vm.console_log}")
    typer.echo(f"VNC: {vm.vnc or '-'}")
    if vm.rto_seconds is None:
        typer.echo(f"warning: no sign of a boot ({check}) within {timeout:.0f} s; the VM keeps running", err=True)
        raise typer.Exit(1)
    typer.echo(f"RTO: {vm.rto_seconds:.1f} s from this command to a booted guest ({check})")


@app.command("status")
def status(ctx: typer.Context) -> None:
    """Recovery VMs: host, point, since, state, console, VNC, RTO."""
    st = state(ctx)
    rows = [
        [vm.host, vm.point, vm.started.strftime("%Y-%m-%d %H:%M:%S"), live, vm.accel, vm.vnc or "-",
         f"{vm.rto_seconds:.1f} s" if vm.rto_seconds is not None else "-", vm.console_log]
        for vm, live in service.status(st.home, st.tools)
    ]  # fmt: skip
    unreadable = recovery.unreadable(st.home)
    rows += [[host, "-", "-", "(unreadable record)", "-", "-", "-", "-"] for host in unreadable]
    typer.echo(table(["HOST", "POINT", "SINCE", "STATE", "ACCEL", "VNC", "RTO", "CONSOLE"], sorted(rows)))
    raise_unreadable(unreadable)


@app.command("stop")
def stop(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The protected host")],
    keep: Annotated[bool, typer.Option("--keep", help="Keep the VM's writes (its overlays) for failback")] = False,
) -> None:
    """Stop HOST's recovery VM; its writes are discarded unless --keep."""
    st = state(ctx)
    vm = service.stop(st.home, st.tools, name, keep=keep)
    kept = f"; its writes are kept in {', '.join(vm.overlays)}" if keep else "; its writes were discarded"
    typer.echo(f"stopped {vm.name}{kept}")
