# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance host add|set|list|show|remove`: the protected hosts."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli._output import parse_size, raise_unreadable, table
from appliance.cli.context import state
from appliance.domain.models import (
    HostKey,
    format_duration,
    parse_duration,
    validate_block_size,
    validate_consistency,
    validate_freeze_limit,
)
from appliance.domain.models import format_size as size
from appliance.domain.recovery import BootCheck, Network, VmSettings
from appliance.domain.retention import RetentionPolicy
from appliance.errors import ConfigError
from appliance.services import hosts as host_service
from appliance.store import hosts as host_store

app = typer.Typer(help="Protected hosts: add, change, list, remove.", no_args_is_help=True)


def _hook(text: str | None) -> tuple[str, ...]:
    """A hook is a command and its arguments, split like a shell would, but never run by a shell."""
    if not text:
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"cannot parse hook {text!r}: {exc}") from exc


def _ask(key: HostKey) -> bool:
    if not sys.stdin.isatty():
        return False
    typer.echo(f"The host presents a {key.key_type} key with fingerprint {key.fingerprint}.", err=True)
    return typer.confirm(
        "Is this the host's key (compare it on the host with ssh-keygen -lf)?", default=False, err=True
    )


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A short name for the host, e.g. web1")],
    address: Annotated[str, typer.Option("--address", help="user@host or user@host:port (user defaults to root)")],
    disk: Annotated[
        list[str], typer.Option("--disk", help="A block device or image file on the host; repeat for more disks")
    ],
    key: Annotated[
        Path, typer.Option("--key", help="Private SSH key the appliance logs in with (copied, readable by root only)")
    ],
    port: Annotated[int | None, typer.Option("--port", help="SSH port [default: 22]")] = None,
    pre_hook: Annotated[
        str | None,
        typer.Option(
            "--pre-hook", help="Command run on the host just before its file systems are frozen (or the read)"
        ),
    ] = None,
    post_hook: Annotated[
        str | None, typer.Option("--post-hook", help="Command run on the host after the thaw (or the read), always")
    ] = None,
    fingerprint: Annotated[
        str | None, typer.Option("--host-key-fingerprint", help="Pin this host key (SHA256:...)")
    ] = None,
    trust_first_use: Annotated[
        bool, typer.Option("--trust-first-use", help="Pin whatever key the host presents now, and print it")
    ] = False,
    python: Annotated[str, typer.Option("--python", help="Python 3 interpreter on the host")] = "python3",
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds without data before a connection counts as lost")
    ] = 60.0,
    block_size: Annotated[
        str,
        typer.Option("--block-size", help="Unit of change detection, 4K..1M (a chain keeps the one it started with)"),
    ] = "32K",
) -> None:
    """Register a protected host: pin its SSH host key and check that every disk can be read."""
    st = state(ctx)
    host, hello = host_service.add_host(
        st.home,
        st.tools,
        name=name,
        address=address,
        port=port,
        disks=disk,
        key=key.expanduser(),
        pre_hook=_hook(pre_hook),
        post_hook=_hook(post_hook),
        fingerprint=fingerprint,
        trust_first_use=trust_first_use,
        confirm=_ask,
        python=python,
        timeout=timeout,
        block_size=validate_block_size(parse_size(block_size)),
    )
    typer.echo(f"pinned host key {host.host_key.fingerprint} ({host.host_key.key_type}) for {host.address}:{host.port}")
    typer.echo(f"added {host.name}: {host.target}, python {hello.python} on the host")
    for d in hello.disks:
        typer.echo(f"  {d.path}: " + (d.error if d.error else f"{size(d.size)} ({d.kind})"))
    if hello.consistency is not None:
        method, why = hello.consistency
        typer.echo(f"points: {_METHODS.get(method, method)} ({why})")


_METHODS = {
    "frozen": "one moment, file systems frozen for the last copy",
    "moment": "one moment, crash-consistent",
    "lvm-snapshot": "one moment, read from LVM snapshots",
    "live": "live reads, NOT consistent",
}


@app.command("set")
def set_(
    ctx: typer.Context,
    name: str,
    address: Annotated[str | None, typer.Option("--address")] = None,
    port: Annotated[int | None, typer.Option("--port")] = None,
    disk: Annotated[list[str] | None, typer.Option("--disk", help="Replaces the list of disks")] = None,
    key: Annotated[Path | None, typer.Option("--key")] = None,
    pre_hook: Annotated[str | None, typer.Option("--pre-hook", help="'' removes it")] = None,
    post_hook: Annotated[str | None, typer.Option("--post-hook", help="'' removes it")] = None,
    fingerprint: Annotated[str | None, typer.Option("--host-key-fingerprint", help="Re-pin the host key")] = None,
    trust_first_use: Annotated[bool, typer.Option("--trust-first-use")] = False,
    python: Annotated[str | None, typer.Option("--python")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout")] = None,
    block_size: Annotated[str | None, typer.Option("--block-size", help="For chains started from now on")] = None,
    max_disk_size: Annotated[
        str | None, typer.Option("--max-disk-size", help="Refuse a disk the host says is larger [default: 64T]")
    ] = None,
    min_rate: Annotated[
        str | None,
        typer.Option("--min-rate", help="Bytes a second a backup keeps up overall, e.g. 1M; slower ends [default: 1M]"),
    ] = None,
    consistency: Annotated[
        str | None,
        typer.Option(
            "--consistency",
            help="auto: one moment where the host allows it (traced freeze, else LVM snapshots) [default];"
            " lvm-snapshot: read LVM snapshots of disks that are LVM volumes; live: plain reads",
        ),
    ] = None,
    freeze_limit: Annotated[
        float | None, typer.Option("--freeze-limit", help="Seconds a freeze may last at most [default: 10]")
    ] = None,
    boot_check: Annotated[str | None, typer.Option("--boot-check", help="console:REGEX, screen or tcp:PORT")] = None,
    verify_boot: Annotated[
        bool | None, typer.Option("--verify-boot/--no-verify-boot", help="Boot-verify each new point")
    ] = None,
    vm_memory: Annotated[int | None, typer.Option("--vm-memory", help="Recovery VM memory, MiB")] = None,
    vm_cpus: Annotated[int | None, typer.Option("--vm-cpus", help="Recovery VM CPUs")] = None,
    vm_network: Annotated[str | None, typer.Option("--vm-network", help="user, none or bridge=NAME")] = None,
    vm_disk_bus: Annotated[str | None, typer.Option("--vm-disk-bus", help="virtio, sata or ide")] = None,
    vm_restart: Annotated[
        bool | None,
        typer.Option("--vm-restart/--no-vm-restart", help="`appliance daemon` restarts its recovery VM after a reboot"),
    ] = None,
    interval: Annotated[str | None, typer.Option("--interval", help="Backup every 15m, 1h, ... (the daemon)")] = None,
    keep_last: Annotated[int | None, typer.Option("--keep-last", help="Keep the N newest points")] = None,
    keep_hourly: Annotated[int | None, typer.Option("--keep-hourly", help="Newest point of each of N hours")] = None,
    keep_daily: Annotated[int | None, typer.Option("--keep-daily", help="Newest point of each of N days")] = None,
    keep_weekly: Annotated[int | None, typer.Option("--keep-weekly", help="Newest point of each of N weeks")] = None,
    keep_monthly: Annotated[int | None, typer.Option("--keep-monthly", help="Newest point of N months")] = None,
) -> None:
    """Change a protected host's settings."""
    st = state(ctx)
    changes: dict[str, object] = _vm_changes(boot_check, verify_boot, vm_memory, vm_cpus, vm_network, vm_disk_bus)
    if vm_restart is not None:
        changes["vm_restart"] = vm_restart
    keep = {
        "last": keep_last,
        "hourly": keep_hourly,
        "daily": keep_daily,
        "weekly": keep_weekly,
        "monthly": keep_monthly,
    }
    if any(v is not None for v in keep.values()):
        RetentionPolicy(**{k: v or 0 for k, v in keep.items()})  # validates the counts
        changes.update({f"keep_{k}": v for k, v in keep.items() if v is not None})
    if interval is not None:
        changes["interval"] = parse_duration(interval)
    if address is not None:
        changes["address"] = address
    if port is not None:
        changes["port"] = port
    if disk:
        changes["disks"] = tuple(disk)
    if pre_hook is not None:
        changes["pre_hook"] = _hook(pre_hook)
    if post_hook is not None:
        changes["post_hook"] = _hook(post_hook)
    if python is not None:
        changes["python"] = python
    if timeout is not None:
        changes["timeout"] = timeout
    if key is not None:
        changes["key"] = key.expanduser()
    if block_size is not None:
        changes["block_size"] = validate_block_size(parse_size(block_size))
    if max_disk_size is not None:
        changes["max_disk_size"] = parse_size(max_disk_size)
    if min_rate is not None:
        changes["min_rate"] = _rate(min_rate)
    if consistency is not None:
        changes["consistency"] = validate_consistency(consistency)
    if freeze_limit is not None:
        changes["freeze_limit"] = validate_freeze_limit(freeze_limit)
    if fingerprint:
        changes["fingerprint"] = fingerprint
    if trust_first_use:
        changes["trust_first_use"] = True
    host = host_service.set_host(st.home, st.tools, name, **changes)
    typer.echo(f"updated {host.name}: {host.target}, host key {host.host_key.fingerprint}")


def _rate(text: str) -> int:
    """'1M', '1M/s', '512K' -> bytes per second."""
    rate = text.strip()
    value = parse_size(rate[:-2] if rate.lower().endswith("/s") else rate)
    if value < 1:
        raise ConfigError(f"invalid rate {text!r}: use e.g. 1M (bytes a second)")
    return value


def _vm_changes(boot_check: str | None, verify_boot: bool | None, memory: int | None, cpus: int | None,
                network: str | None, disk_bus: str | None) -> dict[str, object]:  # fmt: skip
    """Recovery-VM settings, checked the way `failover` will read them."""
    changes: dict[str, object] = {}
    if boot_check is not None:
        changes["boot_check"] = str(BootCheck.parse(boot_check))
    if verify_boot is not None:
        changes["verify_boot"] = verify_boot
    vm = {"vm_memory_mib": memory, "vm_cpus": cpus, "vm_network": network, "vm_disk_bus": disk_bus}
    changes.update({k: v for k, v in vm.items() if v is not None})
    if network is not None or disk_bus is not None or memory is not None or cpus is not None:
        VmSettings(memory or 1024, cpus or 1, Network.parse(network or "user"), disk_bus or "virtio")
    return changes


@app.command("list")
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the protected hosts."""
    home = state(ctx).home
    found, unreadable = host_store.load_all(home)
    if as_json:
        docs = [{"name": h.name, "target": h.target, "disks": list(h.disks)} for h in found]
        docs += [{"name": name, "error": exc.message} for name, exc in unreadable.items()]
        typer.echo(json.dumps(sorted(docs, key=lambda d: str(d["name"])), indent=1))
    else:
        rows = [[h.name, h.target, " ".join(h.disks)] for h in found]
        rows += [[name, "(unreadable record)", "-"] for name in unreadable]
        typer.echo(table(["HOST", "ADDRESS", "DISKS"], sorted(rows)))
    raise_unreadable(unreadable)


@app.command("show")
def show(ctx: typer.Context, name: str) -> None:
    """Show one host's settings."""
    h = host_store.load(state(ctx).home, name)
    rows = [
        ("address", h.target),
        ("host key", f"{h.host_key.fingerprint} ({h.host_key.key_type})"),
        ("disks", " ".join(h.disks)),
        ("pre hook", shlex.join(h.pre_hook) or "-"),
        ("post hook", shlex.join(h.post_hook) or "-"),
        ("python", h.python),
        ("block size", size(h.block_size)),
        ("timeout", f"{h.timeout:.0f} s"),
        ("max disk", f"{size(h.max_disk_size)} (a larger disk is refused)"),
        ("min rate", f"{size(h.min_rate)}/s (a slower backup ends at its deadline)"),
        ("consistency", f"{h.consistency}, freezes end after {h.freeze_limit:g} s at most"),
        ("recovery VM", f"{h.vm_memory_mib} MiB, {h.vm_cpus} CPU, network {h.vm_network}, disks on {h.vm_disk_bus}"),
        ("VM restart", "yes, by the daemon after a reboot" if h.vm_restart else "no"),
        ("boot check", h.boot_check + (", after every backup" if h.verify_boot else "")),
        ("interval", format_duration(h.interval) if h.interval else "- (no scheduled backups)"),
        ("retention", str(RetentionPolicy(h.keep_last, h.keep_hourly, h.keep_daily, h.keep_weekly, h.keep_monthly))),
    ]
    for k, v in rows:
        typer.echo(f"{k + ':':12} {v}")


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: str,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete every recovery point of the host")] = False,
) -> None:
    """Forget a host (its record and key). Its recovery points stay in the store unless --purge."""
    home = state(ctx).home
    host_service.remove_host(home, name, purge=purge)
    typer.echo(f"removed {name}" + ("" if purge else f"; its recovery points remain under {home.chain_dir(name)}"))
