# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench ...`: measurements side by side with peers (rsync, OpenSSH cat) on the lab."""

from __future__ import annotations

from typing import Annotated

import typer

from appliance.cli._output import parse_size
from appliance.cli.context import state

app = typer.Typer(help="Benchmarks against peers, on the lab.", no_args_is_help=True)


@app.command("capture")
def capture(
    ctx: typer.Context,
    disk_size: Annotated[str, typer.Option("--disk-size")] = "2G",
    data: Annotated[float, typer.Option("--data", help="Fraction of the disk holding data")] = 0.4,
    change: Annotated[float, typer.Option("--change", help="Percent of the disk changed before the incremental")] = 1.0,
    block_size: Annotated[str, typer.Option("--block-size", help="The appliance's block size for this run")] = "32K",
    big: Annotated[str, typer.Option("--big", help="Size of the sparse disk of the memory run; 0 skips it")] = "64G",
) -> None:
    """Full and incremental capture against rsync and OpenSSH cat: time, bytes on the wire, peak RSS.

    Runs on lab hosts of its own (APPLIANCE_HOME is not touched) and prints one table."""
    from appliance.bench.capture import run_capture_bench

    run_capture_bench(
        state(ctx).home.root,
        parse_size(disk_size),
        data,
        change / 100.0,
        block_size,
        big=0 if big in ("0", "") else parse_size(big),
    )


@app.command("failover")
def failover(
    big: Annotated[str, typer.Option("--big", help="Size of the large guest disk")] = "64G",
    big_data: Annotated[str, typer.Option("--big-data", help="Data written into the large disk")] = "8G",
) -> None:
    """RTO of failover for a small and a large disk, against booting the raw disk and a naive restore."""
    from appliance.bench.failover import run_failover_bench

    run_failover_bench(parse_size(big), parse_size(big_data))


@app.command("consolidate")
def consolidate_bench() -> None:
    """Merging a middle point away against qemu-img convert and commit; 100-deep against 1-deep reads."""
    from appliance.bench.consolidate import run_consolidate_bench

    run_consolidate_bench()


@app.command("failback")
def failback_bench() -> None:
    """Failback to a blank and to a stale target, against stop + convert + ssh cat: wire, total, downtime."""
    from appliance.bench.failback import run_failback_bench

    run_failback_bench()


@app.command("consistency")
def consistency_bench(
    big: Annotated[str, typer.Option("--big", help="Size of the change-tracking disk")] = "64G",
    data: Annotated[str, typer.Option("--data", help="Data on that disk")] = "4G",
    change: Annotated[float, typer.Option("--change", help="Percent of the disk changed before each run")] = 1.0,
) -> None:
    """Points of a busy server per method (live, fsfreeze hooks, frozen, change-tracked), and a change-tracked
    point of a large disk against the full hash pass and rsync."""
    from appliance.bench.consistency import run_consistency_bench

    run_consistency_bench(parse_size(big), parse_size(data), change / 100.0)


@app.command("replication")
def replication_bench(
    disk_size: Annotated[str, typer.Option("--disk-size")] = "2G",
    data: Annotated[float, typer.Option("--data", help="Fraction of the disk holding data")] = 0.4,
    change: Annotated[float, typer.Option("--change", help="Percent of the disk changed before the increment")] = 1.0,
    rate: Annotated[str, typer.Option("--rate", help="The link's rate, as tc takes it")] = "100mbit",
    rtt: Annotated[float, typer.Option("--rtt", help="The link's round-trip time in milliseconds")] = 30.0,
) -> None:
    """A DR appliance replicating an increment over a shaped link, against rsync and scp on that link."""
    from appliance.bench.replication import run_replication_bench

    run_replication_bench(parse_size(disk_size), data, change / 100.0, rate, rtt / 1000.0)


@app.command("replication-lag")
def replication_lag_bench(
    hosts: Annotated[int, typer.Option("--hosts", min=1, max=50, help="Lab hosts backed up and replicated")] = 10,
    disk_size: Annotated[str, typer.Option("--disk-size", help="Each host's disk")] = "512M",
    data: Annotated[float, typer.Option("--data", help="Fraction of each disk holding data")] = 0.4,
    change: Annotated[float, typer.Option("--change", help="Percent of each disk changed every interval")] = 1.0,
    interval: Annotated[int, typer.Option("--interval", min=10, help="The DR daemon's --every, in seconds")] = 90,
    cycles: Annotated[int, typer.Option("--cycles", min=1, help="Runs of the daemon measured")] = 5,
    rate: Annotated[str, typer.Option("--rate", help="The link's rate, as tc takes it")] = "100mbit",
    rtt: Annotated[float, typer.Option("--rtt", help="The link's round-trip time in milliseconds")] = 30.0,
) -> None:
    """The lag the DR daemon sustains for many hosts at its interval over a shaped link, against rsync."""
    from appliance.bench.replication_lag import run_replication_lag_bench

    run_replication_lag_bench(hosts, parse_size(disk_size), data, change / 100.0, interval, cycles, rate, rtt / 1000)


@app.command("cloud")
def cloud_bench(
    disk_size: Annotated[str, typer.Option("--disk-size")] = "2G",
    data: Annotated[float, typer.Option("--data", help="Fraction of the disk holding data")] = 0.4,
    change: Annotated[float, typer.Option("--change", help="Percent of the disk changed before the increment")] = 1.0,
    rate: Annotated[str, typer.Option("--rate", help="The S3 server's link rate, as tc takes it")] = "100mbit",
    rto_only: Annotated[
        bool, typer.Option("--rto-only", help="Only the RTO, e.g. --disk-size 64G --data 0.125 (8 GiB)")
    ] = False,
) -> None:
    """Cloud push of a point and an increment against rclone over a shaped link to SeaweedFS; the RTO of a
    failover from the bucket against the local one and a download-then-boot."""
    from appliance.bench.cloud import run_cloud_bench, run_cloud_rto_bench

    if rto_only:
        run_cloud_rto_bench(parse_size(disk_size), data, rate)
        return
    run_cloud_bench(parse_size(disk_size), data, change / 100.0, rate)


@app.command("console")
def console_bench(
    sizes: Annotated[list[str] | None, typer.Argument(help="HOSTSxPOINTS, e.g. 10x100 100x100")] = None,
) -> None:
    """The web console's answers (API, page, metrics) and memory as hosts and points grow."""
    from appliance.bench.console import run_console_bench

    chosen = sizes or ["1x10", "10x100", "100x100", "100x1000"]
    try:
        parsed = [(int(a), int(b)) for a, _, b in (s.partition("x") for s in chosen)]
    except ValueError:
        raise typer.BadParameter("use HOSTSxPOINTS, e.g. 10x100") from None
    run_console_bench(parsed)
