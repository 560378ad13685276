# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance lab ...`: protected hosts in network namespaces, to try everything before real servers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli._output import parse_size, table
from appliance.cli.context import state
from appliance.domain.models import format_size as size
from appliance.lab import Lab, disks, guest, sshd_running
from appliance.lab.boot import boot_and_read
from appliance.lab.demo import run_demo

app = typer.Typer(
    help="The built-in lab: protected hosts in network namespaces with a real sshd.", no_args_is_help=True
)


def _lab(ctx: typer.Context) -> Lab:
    return Lab(state(ctx).home.root / "lab")


@app.command("up")
def up(
    ctx: typer.Context,
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Lab host name; repeat for more [default: lab1]")
    ] = None,
    disk_size: Annotated[str, typer.Option("--disk-size", help="Size of each host's disk")] = "1G",
    data: Annotated[float, typer.Option("--data", help="Fraction of the disk holding data")] = 0.4,
    loop: Annotated[
        bool, typer.Option("--loop", help="Give each host a loop block device instead of an image file")
    ] = False,
    image: Annotated[Path | None, typer.Option("--image", help="Start each disk as a copy of this raw image")] = None,
    blank: Annotated[bool, typer.Option("--blank", help="Random data instead of the bootable lab guest")] = False,
) -> None:
    """Start lab hosts (each a namespace running sshd) and print how to add them.

    Each host's disk is the lab guest (images/guest), a small Linux that prints its marker when it
    boots, unless --blank (random data, --data of the disk) or --image."""
    lab = _lab(ctx)
    hosts = lab.up(
        host or ["lab1"], disk_size=parse_size(disk_size), data_fraction=data, loop=loop, disk_image=image,
        with_guest=not blank and image is None,
    )  # fmt: skip
    for h in hosts:
        typer.echo(f"{h.name}: root@{h.address}, disk {h.disk}")
        typer.echo(
            f"  appliance host add {h.name} --address root@{h.address} --disk {h.disk} "
            f"--key {lab.key_file} --trust-first-use"
        )


@app.command("down")
def down(ctx: typer.Context) -> None:
    """Stop every lab host and delete its namespace and disk."""
    _lab(ctx).down()
    typer.echo("lab is down")


@app.command("status")
def status(ctx: typer.Context) -> None:
    """The lab's hosts."""
    rows = [
        [h.name, h.address, h.disk, size(disks.disk_size(h.disk)), "running" if sshd_running(h) else "stopped"]
        for h in _lab(ctx).hosts()
    ]
    typer.echo(table(["HOST", "ADDRESS", "DISK", "SIZE", "SSHD"], rows))


@app.command("change")
def change(
    ctx: typer.Context,
    host: str,
    percent: Annotated[float, typer.Option("--percent", help="Share of the disk to write")] = 1.0,
    marker: Annotated[
        str | None, typer.Option("--marker", help="New marker of the lab guest (shown when it boots)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    autorun: Annotated[
        str | None, typer.Option("--autorun", help="Shell script the lab guest runs once booted")
    ] = None,
) -> None:
    """Write to a lab host's disk as a busy server would (and set the lab guest's marker, or its autorun)."""
    lab = _lab(ctx)
    if autorun is not None:
        guest.write_autorun(lab.host(host).disk, autorun + "\n")
    written = lab.change(host, percent / 100.0, marker=marker, seed=seed)
    typer.echo(f"{host}: wrote {size(written)}" + (f", marker {marker}" if marker else ""))


@app.command("boot")
def boot(ctx: typer.Context, host: str) -> None:
    """Boot a copy of a lab host's disk directly with QEMU and show its console line (e.g. after failback)."""
    h = _lab(ctx).host(host)
    with tempfile.TemporaryDirectory(dir=Path(h.folder)) as tmp:
        copy = Path(tmp) / "boot.img"
        disks.copy_sparse(Path(h.disk), copy)
        seconds, line = boot_and_read(copy, "raw")
    typer.echo(f"{host}: its disk boots: {line} ({seconds:.1f} s)")


@app.command("cut")
def cut(ctx: typer.Context, host: str) -> None:
    """Kill every SSH session of a lab host at once (a link failure mid-transfer)."""
    _lab(ctx).cut(host)


@app.command("demo")
def demo(ctx: typer.Context) -> None:
    """The main job on the lab, each step shown as the command a user would type."""
    st = state(ctx)
    run_demo(st.home.root)
