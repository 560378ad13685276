# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance cloud ...`: recovery points in S3-compatible object storage (services/cloud/, a module per command)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli._output import parse_size, table
from appliance.cli.context import state
from appliance.domain.models import format_duration, parse_duration
from appliance.domain.models import format_size as size
from appliance.domain.retention import RetentionPolicy
from appliance.domain.schedule import parse_window
from appliance.errors import EXIT_WARNING, CloudError, ConfigError
from appliance.services.cloud import points as cloud_points
from appliance.services.cloud import prune as cloud_prune
from appliance.services.cloud import push as cloud_push
from appliance.services.cloud import restore as cloud_restore
from appliance.services.cloud import setup as cloud_setup
from appliance.services.cloud import verify as cloud_verify
from appliance.store import cloud as records

app = typer.Typer(help="Cloud copies: sealed, locked recovery points in an S3 bucket, bootable from there.",
                  no_args_is_help=True)  # fmt: skip
key_app = typer.Typer(help="The cloud store's encryption key.", no_args_is_help=True)
app.add_typer(key_app, name="key")

_KEEP = {k: typer.Option(f"--keep-{k}", help=f"The bucket's retention: keep-{k} (restic's forget)")
         for k in ("last", "hourly", "daily", "weekly", "monthly")}  # fmt: skip


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="cloud")


def _keep(last: int | None, hourly: int | None, daily: int | None, weekly: int | None,
          monthly: int | None) -> dict[str, int] | None:  # fmt: skip
    given = {"last": last, "hourly": hourly, "daily": daily, "weekly": weekly, "monthly": monthly}
    chosen = {k: v for k, v in given.items() if v is not None}
    if not chosen:
        return None
    RetentionPolicy(**chosen)
    return chosen


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A short name for the store, e.g. b2")],
    endpoint: Annotated[str, typer.Option("--endpoint", help="The S3 endpoint URL, e.g. https://s3.example.com")],
    bucket: Annotated[str, typer.Option("--bucket", help="A bucket of the appliance's own (empty)")],
    credentials_file: Annotated[
        Path, typer.Option("--credentials-file", help="AWS credentials file or one line KEY:SECRET (mode 0600)")
    ],
    region: Annotated[str, typer.Option("--region", help="The bucket's region")] = "us-east-1",
    lock_days: Annotated[
        int, typer.Option("--lock-days", help="Object Lock every object a point needs for N days (0: no lock)")
    ] = 0,
    lock_mode: Annotated[str, typer.Option("--lock-mode", help="compliance (no one can shorten it) or governance")] = (
        "compliance"
    ),
    bandwidth: Annotated[str, typer.Option("--bandwidth", help="Bytes a second a push may take, e.g. 20M")] = "0",
    window: Annotated[str, typer.Option("--window", help="When the daemon may push, HH:MM-HH:MM local")] = "",
    keep_last: Annotated[int | None, _KEEP["last"]] = None,
    keep_hourly: Annotated[int | None, _KEEP["hourly"]] = None,
    keep_daily: Annotated[int | None, _KEEP["daily"]] = None,
    keep_weekly: Annotated[int | None, _KEEP["weekly"]] = None,
    keep_monthly: Annotated[int | None, _KEEP["monthly"]] = None,
) -> None:
    """Add a bucket as a cloud store: checks it (and that it enforces Object Lock), makes the store's key."""
    st = state(ctx)
    if window:
        parse_window(window)
    added = cloud_setup.add(st.home, st.tools, name=name, endpoint=endpoint, bucket=bucket, region=region,
                            credentials=credentials_file, lock_days=lock_days, lock_mode=lock_mode.upper(),
                            bandwidth=parse_size(bandwidth) if bandwidth != "0" else 0, window=window,
                            keep=_keep(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly))  # fmt: skip
    typer.echo(f"added cloud store {name}: bucket {bucket} at {endpoint}, {_describe(added.store)}")
    if added.lock_proved:
        typer.echo(added.lock_proved)
    typer.echo(f"keep its key safe, away from this appliance: appliance cloud key export {name} > {name}.key",
               err=True)  # fmt: skip


def _describe(store: records.CloudStore) -> str:
    lock = f"{store.lock_mode.lower()} lock {store.lock_days} days" if store.lock_days else "no Object Lock"
    limit = f"{size(store.bandwidth)}/s" if store.bandwidth else "no bandwidth limit"
    when = f"every {format_duration(store.interval)}" if store.interval else "after each new point"
    keep = str(RetentionPolicy(**store.keep)) if store.keep else "keep every point"
    return f"{lock}, {limit}, daemon pushes {when}" + (f" inside {store.window}" if store.window else "") + f", {keep}"


@app.command("list")
def list_stores(ctx: typer.Context) -> None:
    """The cloud stores this appliance pushes to."""
    home = state(ctx).home
    rows = []
    for name in records.names(home):
        store = records.load(home, name)
        rows.append([name, store.endpoint, store.bucket, _describe(store)])
    typer.echo(table(["STORE", "ENDPOINT", "BUCKET", "SETTINGS"], rows))


@app.command("set")
def set_store(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The store")],
    bandwidth: Annotated[str | None, typer.Option("--bandwidth", help="Bytes a second; 0: no limit")] = None,
    window: Annotated[str | None, typer.Option("--window", help="HH:MM-HH:MM local; '': always")] = None,
    every: Annotated[
        str | None, typer.Option("--every", help="The daemon pushes every 1h, ...; 0: after each point")
    ] = None,
    keep_last: Annotated[int | None, _KEEP["last"]] = None,
    keep_hourly: Annotated[int | None, _KEEP["hourly"]] = None,
    keep_daily: Annotated[int | None, _KEEP["daily"]] = None,
    keep_weekly: Annotated[int | None, _KEEP["weekly"]] = None,
    keep_monthly: Annotated[int | None, _KEEP["monthly"]] = None,
) -> None:
    """Change how and when this appliance pushes to a store, and the bucket's retention."""
    home = state(ctx).home
    store = records.load(home, name)
    if bandwidth is not None:
        store = replace(store, bandwidth=parse_size(bandwidth) if bandwidth != "0" else 0)
    if window is not None:
        parse_window(window)
        store = replace(store, window=window)
    if every is not None:
        store = replace(store, interval=parse_duration(every) if every != "0" else 0.0)
    keep = _keep(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
    if keep is not None:
        store = replace(store, keep=keep)
    records.save(home, store)
    typer.echo(f"updated cloud store {name}: {_describe(store)}")


@app.command("remove")
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The store")]) -> None:
    """Forget a store here (the bucket keeps what it holds; `cloud attach` finds it again with the key)."""
    home = state(ctx).home
    records.load(home, name)
    records.remove(home, name)
    typer.echo(f"removed cloud store {name} from this appliance (the bucket was left as it is)")


@key_app.command("export")
def key_export(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The store")]) -> None:
    """Print the store's key file (stdout) and the key as 24 words to write on paper (stderr)."""
    text, words = cloud_setup.key_export(state(ctx).home, name)
    sys.stdout.write(text)
    typer.echo(f"the key of cloud store {name} as words (write them down; `cloud attach --key-words` takes them):\n"
               f"  {words}", err=True)  # fmt: skip


@app.command("attach")
def attach(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="A name for the store here [default: its name in the key file]")
    ] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="The file `cloud key export` wrote")] = None,
    key_words: Annotated[
        str | None, typer.Option("--key-words", help="The 24 words instead (with --endpoint, --bucket, --store-id)")
    ] = None,
    credentials_file: Annotated[
        Path | None, typer.Option("--credentials-file", help="The bucket's credentials")
    ] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="Another endpoint than the key file's")] = None,
    bucket: Annotated[str | None, typer.Option("--bucket", help="Another bucket than the key file's")] = None,
) -> None:
    """Attach a store another appliance pushed to (e.g. on a new machine after a disaster)."""
    st = state(ctx)
    if credentials_file is None:
        raise ConfigError("attach needs --credentials-file (the bucket's access key and secret)")
    if key_file is None and key_words is None:
        raise ConfigError("attach needs --key-file (or --key-words)")
    if key_file is not None:
        try:
            text = key_file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {key_file} ({exc.strerror})") from exc
    else:
        text = cloud_setup.key_text_from_words(str(key_words), name=name, endpoint=endpoint, bucket=bucket,
                                               credentials=credentials_file, tools=st.tools)  # fmt: skip
    store, count = cloud_setup.attach(st.home, st.tools, key_text=text, credentials=credentials_file, name=name,
                                      endpoint=endpoint, bucket=bucket)  # fmt: skip
    typer.echo(f"attached cloud store {store.name}: bucket {store.bucket} at {store.endpoint}, {count} point(s)")


@app.command("push")
def push(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The store")],
    host: Annotated[str | None, typer.Argument(help="Only this host")] = None,
) -> None:
    """Send each host's newest point the bucket lacks (only blocks it does not hold), then its retention."""
    st = state(ctx)
    cloud_push.push(st.home, st.tools, name, host, say=typer.echo)


@app.command("points")
def points(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The store")],
    host: Annotated[str | None, typer.Argument(help="Only this host")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False,
) -> None:
    """What the bucket holds (read from the bucket, not from this appliance), with each point's lock."""
    st = state(ctx)
    listed = cloud_points.points(st.home, st.tools, name, host)
    if as_json:
        typer.echo(json.dumps([{
            "host": p.point.host, "point": p.point.point, "created": p.point.created.isoformat(),
            "pushed": p.point.pushed.isoformat(), "manifest": p.manifest, "hidden": p.hidden,
            "lock": None if p.lock is None else {"mode": p.lock.mode, "until": p.lock.until.isoformat()},
            "disks": [{"slot": d.slot, "size": d.size, "digest": d.digest} for d in p.point.disks],
        } for p in listed], indent=1))  # fmt: skip
        return
    rows = [[p.point.host, p.point.point, p.point.created.strftime("%Y-%m-%d %H:%M:%S"),
             size(sum(d.size for d in p.point.disks)),
             f"{p.lock.mode.lower()} until {p.lock.until:%Y-%m-%d %H:%M}" if p.lock else "not locked",
             "hidden by a delete marker" if p.hidden else ""] for p in listed]  # fmt: skip
    typer.echo(table(["HOST", "POINT", "TAKEN (UTC)", "SIZE", "LOCK", ""], rows))


@app.command("verify")
def verify(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The store")],
    host: Annotated[str | None, typer.Argument(help="Only this host")] = None,
    deep: Annotated[
        bool, typer.Option("--deep", help="Read every block back and recompute each disk's digest")
    ] = False,
) -> None:
    """Every object each point needs is there and opens; --deep: every byte is read and checked."""
    st = state(ctx)
    report = cloud_verify.verify(st.home, st.tools, name, host, deep, say=typer.echo)
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    for p in report.problems:
        typer.echo(f"problem: {p}", err=True)
    typer.echo(
        f"{report.points} point(s), {report.packs} pack(s) checked" + (f", {report.blocks} blocks read" if deep else "")
    )
    if not report.ok:
        raise CloudError(f"cloud store {name}: {len(report.problems)} problem(s), first: {report.problems[0]}")
    if report.warnings:
        raise typer.Exit(EXIT_WARNING)


@app.command("restore")
def restore(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The store")],
    host: Annotated[str, typer.Argument(help="The host")],
    to: Annotated[Path | None, typer.Option("--to", help="A file or block device to write the disk to (raw)")] = None,
    to_store: Annotated[
        bool, typer.Option("--to-store", help="Into this appliance's chain of the host, as its newest point")
    ] = False,
    point: Annotated[str | None, typer.Option("--point", help="The point [default: the newest]")] = None,
) -> None:
    """Write a point from the bucket to a file or a device, or into the local chain; checked against its digest.

    Onto repaired hardware: `failover HOST --from STORE`, then `failback HOST --to ...` (the VM's disk over SSH)."""
    st = state(ctx)
    if (to is None) == (not to_store):
        raise ConfigError("restore needs one of --to PATH or --to-store")
    if to_store:
        made = cloud_restore.restore_to_store(st.home, st.tools, name, host, point, say=typer.echo)
        typer.echo(f"restored {host}'s point {made.id} into this appliance's chain, digest checked")
        return
    assert to is not None
    done, fetched = cloud_restore.restore(st.home, st.tools, name, host, point, to, say=typer.echo)
    typer.echo(f"restored {host}'s point {done.point} to {to} ({size(fetched)} fetched), digest checked")


@app.command("prune")
def prune(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The store")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; delete nothing")] = False,
) -> None:
    """Apply the bucket's retention: drop points no rule keeps (once unlocked), and packs no point needs."""
    st = state(ctx)
    for line in cloud_prune.prune(st.home, st.tools, name, dry_run):
        typer.echo(line)
