# SPDX-License-Identifier: GPL-2.0-or-later
"""What every cloud command shares, and no command owns: a store opened (its record, bucket and sealer), the
bucket's layout (the `config` object, manifests under points/, packs under data/), the index made the bucket's
again, the lock a new object is put under, a point located (a restore and a failover from a bucket start
there), a host's record made from a point's settings, every block of a disk read back in order with its
digest (a deep verify and a restore), and the bucket's retention (a prune, and a push after it sends).

It is here so that no command imports another: each command module, and services/failover.py, take what
they share from this one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.domain.blocks import DiskDigest, zero_hash
from appliance.domain.cloud import ZERO, CloudPoint, PackRef, lock_until
from appliance.domain.models import Host, HostKey, Point
from appliance.domain.retention import DROP, RetentionPolicy, plan
from appliance.errors import CloudKeyError, CloudObjectError, PointNotFoundError
from appliance.log import get_logger
from appliance.ports import BucketAccess, ObjectLock, ObjectStorage, Tools
from appliance.services.cloud_reader import DiskReader
from appliance.store import cloud as records
from appliance.store import hosts
from appliance.store.cloud import CloudStore, Index, IndexedPoint
from appliance.store.layout import Home
from appliance.transfer import replica
from appliance.transfer.sealed import KeyFile, Sealer, SealError, open_manifest

log = get_logger(__name__)

CONFIG = "config"  # the bucket's plain config object: which store it holds, its lock, a check of its key

Say = Callable[[str], None]


# -- a store opened -----------------------------------------------------------------------------------------


def access_of(home: Home, store: CloudStore) -> BucketAccess:
    """The bucket and the credentials kept for it here (also what an NBD server of a failover reads)."""
    key_id, secret = records.credentials(home, store.name)
    return BucketAccess(store.endpoint, store.bucket, store.region, key_id, secret)


def sealer_of(home: Home, store: CloudStore) -> Sealer:
    """The store's sealer, from its key file here (refused if the key file is another store's)."""
    key = key_file_of(home, store.name)
    if key.store_id != store.store_id:
        raise CloudKeyError(f"cloud store {store.name}'s key file is for another store")
    return Sealer(key.key, store.store_id)


def key_file_of(home: Home, name: str) -> KeyFile:
    """The store's key file as kept here (0600)."""
    try:
        return KeyFile.loads(records.read_secret(home, name, "key"))
    except SealError as exc:
        raise CloudKeyError(f"cloud store {name}'s key file does not read: {exc}") from exc


@dataclass
class Opened:
    """A store ready to use: its record, bucket and sealer."""

    store: CloudStore
    bucket: ObjectStorage
    sealer: Sealer


def open_store(home: Home, tools: Tools, name: str) -> Opened:
    """The store named `name` here, with its bucket and sealer: where every command begins."""
    store = records.load(home, name)
    return Opened(store, tools.bucket(access_of(home, store)), sealer_of(home, store))


# -- what the bucket holds ----------------------------------------------------------------------------------


def read_config(storage: ObjectStorage, bucket: str) -> dict[str, Any]:
    """The bucket's config object: which store it holds (plain JSON: the store's id is no secret)."""
    try:
        config = json.loads(storage.get(CONFIG))
    except CloudObjectError as exc:
        raise CloudKeyError(f"bucket {bucket} holds no appliance cloud store") from exc
    except ValueError as exc:
        raise CloudObjectError(f"object {CONFIG} of bucket {bucket} is damaged ({exc})") from exc
    if not isinstance(config, dict):
        raise CloudObjectError(f"object {CONFIG} of bucket {bucket} is damaged (not a JSON object)")
    return config


def checked_config(storage: ObjectStorage, key: KeyFile) -> dict[str, Any]:
    """The bucket's config object, once it is shown to be the key's store and the key opens it."""
    config = read_config(storage, key.bucket)
    if config.get("store") != key.store_id:
        raise CloudKeyError(f"the key file is for store {key.store_id}, bucket {key.bucket} holds another store")
    if not Sealer(key.key, key.store_id).checks(str(config.get("key_check", ""))):
        raise CloudKeyError(f"the key file does not open bucket {key.bucket}'s store: not its key")
    return config


def open_point(sealer: Sealer, key: str, sealed: bytes) -> CloudPoint:
    """A manifest opened (object `key`), or the object named as damaged."""
    try:
        return open_manifest(sealer, sealed)
    except (SealError, ValueError) as exc:
        raise CloudObjectError(f"object {key} is damaged: the manifest does not open ({exc})") from exc


def refresh_points(index: Index, storage: ObjectStorage, sealer: Sealer) -> int:
    """Make the index's points the bucket's (a manifest another appliance wrote is read; one gone, dropped)."""
    listed = {o.key: o for o in storage.listing("points/")}
    known = {p.manifest: p for p in index.points()}
    for manifest in known.keys() - listed.keys():
        index.drop_point(manifest)
    for key in sorted(listed.keys() - known.keys()):
        sealed = storage.get(key, listed[key].version)
        point = open_point(sealer, key, sealed)
        index.add_point(IndexedPoint(key, listed[key].version, point.host, point.point, point.created, None, sealed))
    return len(listed)


def refresh_packs(index: Index, storage: ObjectStorage) -> None:
    """Packs the bucket holds and the index does not know (another appliance's) enter it, entries unread."""
    known = {ref.name for ref, _, _ in index.packs()}
    for o in storage.listing("data/"):
        if o.key not in known:
            index.add_pack(PackRef(o.key, o.version, o.size), [], None, o.modified)


# -- a point found: a restore and a failover from the bucket begin here -------------------------------------


@dataclass(frozen=True, slots=True)
class Located:
    """A bucket's point found: what a restore and a failover from the bucket read."""

    opened: Opened
    point: CloudPoint
    manifest: str  # its object's key
    version: str | None


def locate(home: Home, tools: Tools, name: str, host: str, point_id: str | None) -> Located:
    """The bucket's point of `host` (its newest when `point_id` is None), as the bucket lists it now."""
    opened = open_store(home, tools, name)
    with Index(home, name) as index:
        refresh_points(index, opened.bucket, opened.sealer)
        listed = index.points(host)
    if point_id is not None:
        listed = [p for p in listed if p.point == point_id]
    if not listed:
        what = f"no point {point_id} of {host}" if point_id else f"no point of {host}"
        raise PointNotFoundError(f"cloud store {name} holds {what}",
                                 hint=f"`appliance cloud points {name}` lists what it holds")  # fmt: skip
    chosen = listed[-1]
    return Located(opened, open_point(opened.sealer, chosen.manifest, chosen.sealed), chosen.manifest, chosen.version)


def cloud_host(home: Home, name: str, store: str, settings: dict[str, object]) -> Host:
    """The host's record here, or one made from a cloud point's settings (marked as coming from the store:
    `host set NAME --address ... --key ...` makes it a host this appliance backs up again)."""
    if hosts.exists(home, name):
        return hosts.load(home, name)
    disks = settings.get("disks")
    if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
        raise CloudObjectError(f"cloud store {store}'s point of {name} does not list its disks")
    host = Host(name=name, address="", user="root", port=22, key_file="", host_key=HostKey("", "", ""),
                disks=tuple(disks), replica_of=f"cloud store {store}")  # fmt: skip
    host = replica.with_settings(host, settings)
    hosts.save(home, host)
    return host


# -- locks --------------------------------------------------------------------------------------------------


def new_lock(store: CloudStore, now: datetime) -> ObjectLock | None:
    """The lock an object put `now` is put under (None: the store has no lock)."""
    return ObjectLock(store.lock_mode, lock_until(now, store.lock_days)) if store.lock_days else None


def lock_date(store: CloudStore, now: datetime) -> datetime | None:
    """Until when that lock holds, as the index records it."""
    return lock_until(now, store.lock_days) if store.lock_days else None


def utc_now() -> datetime:
    return datetime.now(UTC)


# -- a disk read back ---------------------------------------------------------------------------------------


def each_block(reader: DiskReader, take: Callable[[int, bytes, bool], None]) -> str:
    """Every block of the disk in order to `take(block, bytes, reads as zeroes)`; returns the disk's digest
    over what was read (domain/blocks.py: the digest `appliance verify` checks)."""
    digest = DiskDigest()
    step = 256
    for first in range(0, reader.total, step):
        for b, data in reader.blocks(first, step):
            zero = reader.map.get(b)[0] == ZERO
            digest.add(zero_hash(len(data)) if zero else hashlib.sha256(data).digest())
            take(b, data, zero)
    return digest.hexdigest()


# -- the bucket's retention ---------------------------------------------------------------------------------


def apply_retention(opened: Opened, index: Index, dry_run: bool) -> list[str]:
    """Drop the manifests the bucket's policy does not keep (once their lock lets go), then delete packs no
    manifest needs (once theirs does). A locked object is never asked to be deleted: it waits."""
    policy = RetentionPolicy(**(opened.store.keep or {}))
    now = utc_now()
    lines: list[str] = []
    by_host: dict[str, list[IndexedPoint]] = {}
    for p in index.points():
        by_host.setdefault(p.host, []).append(p)
    for host, listed in sorted(by_host.items()):
        as_points = [Point(id=p.manifest, created=p.created, seconds=0.0, disks=()) for p in listed]
        for decision in plan(as_points, policy, {}, {}):
            if decision.action != DROP:
                continue
            p = next(x for x in listed if x.manifest == decision.point)
            if p.lock_until is not None and p.lock_until > now:
                lines.append(f"{host} {p.point}: kept until its lock ends ({p.lock_until:%Y-%m-%d})")
                continue
            lines.append(f"{host} {p.point}: {'would drop' if dry_run else 'dropped'} (no rule keeps it)")
            if not dry_run:
                delete_all(opened.bucket, p.manifest)
                index.drop_point(p.manifest)
    needed = set()
    for p in index.points():
        needed |= {ref.name for ref in open_point(opened.sealer, p.manifest, p.sealed).packs}
    freed = 0
    known = {ref.name: (ref, until) for ref, until, _ in index.packs()}
    for o in opened.bucket.listing("data/"):  # a pack a killed push put but never recorded is here too
        if o.key not in known:
            lock = opened.bucket.lock_of(o.key, o.version) if opened.store.lock_days else None
            known[o.key] = (PackRef(o.key, o.version, o.size), lock.until if lock else None)
    for ref, until in known.values():
        if ref.name in needed or (until is not None and until > now):
            continue
        if not dry_run:
            delete_all(opened.bucket, ref.name)
            index.drop_pack(ref.name)
        freed += ref.size
    if freed:
        lines.append(f"{'would free' if dry_run else 'freed'} {mib(freed)} of packs no point needs")
    log.info("cloud.pruned", store=opened.store.name, dry_run=dry_run, lines=len(lines), freed=freed)
    return lines


def delete_all(bucket: ObjectStorage, key: str) -> None:
    """Every version of the object (a delete without one only hides it behind a marker)."""
    versions: list[str | None] = [None if v == "null" else v for v in bucket.versions(key)]
    for version in versions or [None]:
        bucket.delete(key, version)


def mib(n: int) -> str:
    """Bytes as the commands' lines say them."""
    return f"{n / (1 << 20):.1f} MiB"
