# SPDX-License-Identifier: GPL-2.0-or-later
"""The cloud copy: recovery points in an S3 bucket, sealed, locked, and readable without this appliance.

`cloud add` proves the bucket (credentials, emptiness, Object Lock by a canary it fails to delete) and makes
the store's key. `cloud push` sends each host's newest point the bucket lacks: its blocks are compared, by id,
with the host's newest point in the bucket (domain/cloud.py for the layout, transfer/sealed.py for the
sealing); only blocks the bucket does not hold are read (through QEMU, from the point's qcow2 chain), sealed,
packed and uploaded. A pack counts once the bucket acknowledged it (index.sqlite): a push killed at any
moment goes on with the blocks it had not sent. The point's manifest is written last: a point is in the
bucket once its manifest is. Then every pack the point needs is locked at least `lock_days` from now.

The bucket's retention (`cloud set --keep-*`) then drops manifests no rule keeps (once their lock allows)
and deletes packs no manifest needs any more (once theirs does): nothing is re-uploaded.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mnemonic import Mnemonic

from appliance.domain.blocks import HASH_LEN, DiskDigest, block_count, block_length, is_zero_hash, zero_hash
from appliance.domain.cloud import (
    PACK_TARGET,
    ZERO,
    BlockMap,
    CloudDisk,
    CloudPoint,
    PackRef,
    lock_until,
    needs_extension,
)
from appliance.domain.models import DiskPoint, Host, HostKey, Point, validate_new_host_name
from appliance.domain.retention import DROP, RetentionPolicy, plan
from appliance.errors import (
    CloudError,
    CloudKeyError,
    CloudLockError,
    CloudObjectError,
    ConfigError,
    HostNotFoundError,
    PointNotFoundError,
)
from appliance.log import get_logger
from appliance.ports import BucketAccess, ExportedImage, ObjectLock, ObjectStorage, Tools
from appliance.services.backup import Import, record_point
from appliance.services.cloud_reader import DiskReader, PackHeaders, fetch_header
from appliance.services.pipeline import Pace
from appliance.store import catalog, chains, hosts
from appliance.store import cloud as records
from appliance.store.cloud import CloudStore, Index, IndexedPoint
from appliance.store.layout import Home
from appliance.transfer import replica
from appliance.transfer.sealed import KeyFile, PackWriter, Sealer, SealError, new_key, open_manifest, seal_manifest

log = get_logger(__name__)

CONFIG = "config"
LOCK_MODES = ("COMPLIANCE", "GOVERNANCE")
_READ_AT_ONCE = 32  # blocks read from a point's export in one go (1 MiB at 32 KiB)

Say = Callable[[str], None]


# -- the store ----------------------------------------------------------------------------------------------


def read_credentials(path: Path) -> tuple[str, str]:
    """An AWS shared-credentials file ([default] aws_access_key_id, aws_secret_access_key), or one line
    ACCESS_KEY:SECRET. Refused when others may read it: the secret would not be the appliance's alone."""
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} may be read by others than its owner: chmod 600 it first")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the credentials file {path} ({exc.strerror})") from exc
    parser = configparser.ConfigParser()
    try:
        parser.read_string(text)
    except configparser.Error:
        parser = configparser.ConfigParser()
    for section in ("default", *parser.sections()):
        if parser.has_option(section, "aws_access_key_id") and parser.has_option(section, "aws_secret_access_key"):
            return parser.get(section, "aws_access_key_id").strip(), parser.get(
                section, "aws_secret_access_key"
            ).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    if len(lines) == 1 and lines[0].count(":") == 1 and all(lines[0].split(":")):
        key_id, secret = lines[0].split(":")
        return key_id, secret
    raise ConfigError(f"{path} holds no credentials: an AWS credentials file ([default] aws_access_key_id, "
                      "aws_secret_access_key) or one line ACCESS_KEY:SECRET")  # fmt: skip


def access_of(home: Home, store: CloudStore) -> BucketAccess:
    key_id, secret = records.credentials(home, store.name)
    return BucketAccess(store.endpoint, store.bucket, store.region, key_id, secret)


def sealer_of(home: Home, store: CloudStore) -> Sealer:
    key = _key_file(home, store.name)
    if key.store_id != store.store_id:
        raise CloudKeyError(f"cloud store {store.name}'s key file is for another store")
    return Sealer(key.key, store.store_id)


def _key_file(home: Home, name: str) -> KeyFile:
    try:
        return KeyFile.loads(records.read_secret(home, name, "key"))
    except SealError as exc:
        raise CloudKeyError(f"cloud store {name}'s key file does not read: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Added:
    store: CloudStore
    lock_proved: str  # what the canary showed ("" when no lock was asked)


def add(home: Home, tools: Tools, *, name: str, endpoint: str, bucket: str, region: str, credentials: Path,
        lock_days: int, lock_mode: str, bandwidth: int, window: str, keep: dict[str, int] | None) -> Added:  # fmt: skip
    """Check the bucket and make a new store in it (refused if it holds anything that is not ours)."""
    validate_new_host_name(name)
    if records.exists(home, name):
        raise ConfigError(
            f"a cloud store named {name} exists", hint="`appliance cloud remove` it first, or pick a name"
        )
    if lock_mode not in LOCK_MODES:
        raise ConfigError(f"invalid lock mode {lock_mode!r}: compliance or governance")
    if lock_days < 0:
        raise ConfigError(f"invalid --lock-days {lock_days}: 0 (no lock) or more")
    if keep is not None:
        RetentionPolicy(**keep)
    key_id, secret = read_credentials(credentials)
    access = BucketAccess(endpoint, bucket, region, key_id, secret)
    storage = tools.bucket(access)
    _refuse_unless_empty(storage, bucket)
    proved = _prove_lock(storage, bucket, lock_days, lock_mode) if lock_days else ""
    store = CloudStore(name=name, store_id=uuid.uuid4().hex, endpoint=endpoint, bucket=bucket, region=region,
                       lock_days=lock_days, lock_mode=lock_mode, bandwidth=bandwidth, window=window,
                       keep=keep)  # fmt: skip
    key = KeyFile(store.store_id, new_key(), name, endpoint, bucket, region)
    sealer = Sealer(key.key, store.store_id)
    config = {"format": "appliance-cloud", "version": 1, "store": store.store_id, "created": _now().isoformat(),
              "lock_days": lock_days, "lock_mode": lock_mode, "key_check": sealer.key_check()}  # fmt: skip
    storage.put(CONFIG, json.dumps(config, indent=1).encode(), _lock(store, _now()))
    records.write_credentials(home, name, key_id, secret)
    records.write_secret(home, name, "key", key.dumps())
    records.save(home, store)
    log.info("cloud.added", store=name, endpoint=endpoint, bucket=bucket, lock_days=lock_days, lock_mode=lock_mode)
    return Added(store, proved)


def _refuse_unless_empty(storage: ObjectStorage, bucket: str) -> None:
    found = storage.listing("")
    if not found:
        return
    if any(o.key == CONFIG for o in found):
        raise ConfigError(f"bucket {bucket} already holds an appliance's cloud store",
                          hint="`appliance cloud attach` it with the key file `cloud key export` wrote")  # fmt: skip
    raise ConfigError(f"bucket {bucket} is not empty ({len(found)} objects, e.g. {found[0].key!r}) and holds no "
                      "appliance cloud store", hint="give the appliance a bucket of its own")  # fmt: skip


def _prove_lock(storage: ObjectStorage, bucket: str, days: int, mode: str) -> str:
    """Write a locked canary and try to delete its version: a bucket that lets the delete through does not
    enforce Object Lock, and an appliance that trusted it would keep nothing immutable."""
    key = f"canary/{secrets.token_hex(8)}"
    until = _now() + timedelta(days=1)
    try:
        version = storage.put(key, b"appliance object lock canary\n", ObjectLock(mode, until))
    except CloudLockError as exc:
        raise CloudLockError(f"bucket {bucket} has no Object Lock: it refused a locked object ({exc})") from exc
    if version is None:
        raise CloudLockError(f"bucket {bucket} has no versioning, so no Object Lock: a locked object has no version")
    try:
        storage.delete(key, version)
    except CloudLockError:
        log.info("cloud.canary_held", bucket=bucket, mode=mode)
        return f"a {mode.lower()}-locked canary ({key}) could not be deleted: the bucket enforces Object Lock"
    raise CloudLockError(f"bucket {bucket} does not enforce Object Lock: the appliance deleted a locked object "
                         f"({key}, {mode.lower()} mode, locked for {days} days)")  # fmt: skip


def _lock(store: CloudStore, now: datetime) -> ObjectLock | None:
    return ObjectLock(store.lock_mode, lock_until(now, store.lock_days)) if store.lock_days else None


def key_export(home: Home, name: str) -> tuple[str, str]:
    """(the key file's text, the key as 24 words to write on paper)."""
    records.load(home, name)
    key = _key_file(home, name)
    return key.dumps(), key_words(key.key)


def key_words(key: bytes) -> str:
    return str(Mnemonic("english").to_mnemonic(key))


def key_from_words(words: str) -> bytes:
    m, words = Mnemonic("english"), " ".join(words.split())
    if not m.check(words):
        raise CloudKeyError("those words are not a cloud store key (a word is wrong or missing)")
    return bytes(m.to_entropy(words))


def key_text_from_words(
    words: str,
    *,
    name: str | None,
    endpoint: str | None,
    bucket: str | None,
    credentials: Path,
    tools: Tools,
    region: str = "us-east-1",
) -> str:
    """A key file from the 24 words on paper: the store's id is read from the bucket's config object."""
    if not endpoint or not bucket:
        raise ConfigError("attaching with --key-words needs --endpoint and --bucket (the words hold only the key)")
    key = key_from_words(words)
    key_id, secret = read_credentials(credentials)
    storage = tools.bucket(BucketAccess(endpoint, bucket, region, key_id, secret))
    store_id = str(_config(storage, bucket).get("store", ""))
    return KeyFile(store_id, key, name or "cloud", endpoint, bucket, region).dumps()


def attach(home: Home, tools: Tools, *, key_text: str, credentials: Path, name: str | None = None,
           endpoint: str | None = None, bucket: str | None = None, region: str | None = None,
           say: Say = lambda _: None) -> tuple[CloudStore, int]:  # fmt: skip
    """Attach a store another appliance made (the office burned): its key file and credentials suffice."""
    try:
        key = KeyFile.loads(key_text)
    except SealError as exc:
        raise CloudKeyError(str(exc)) from exc
    name = name or key.name
    validate_new_host_name(name)
    if records.exists(home, name):
        raise ConfigError(f"a cloud store named {name} exists here", hint="pass --name for another name")
    key = dataclasses.replace(key, name=name, endpoint=endpoint or key.endpoint, bucket=bucket or key.bucket,
                              region=region or key.region)  # fmt: skip
    key_id, secret = read_credentials(credentials)
    storage = tools.bucket(BucketAccess(key.endpoint, key.bucket, key.region, key_id, secret))
    config = _read_config(storage, key)
    store = CloudStore(name=name, store_id=key.store_id, endpoint=key.endpoint, bucket=key.bucket, region=key.region,
                       lock_days=int(config.get("lock_days", 0)),
                       lock_mode=str(config.get("lock_mode", "COMPLIANCE")))  # fmt: skip
    records.write_credentials(home, name, key_id, secret)
    records.write_secret(home, name, "key", key.dumps())
    records.save(home, store)
    with Index(home, name) as index:
        count = _refresh_points(index, storage, Sealer(key.key, key.store_id))
        _refresh_packs(index, storage)
    log.info("cloud.attached", store=name, bucket=key.bucket, points=count)
    return store, count


def _config(storage: ObjectStorage, bucket: str) -> dict[str, Any]:
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


def _read_config(storage: ObjectStorage, key: KeyFile) -> dict[str, Any]:
    config = _config(storage, key.bucket)
    if config.get("store") != key.store_id:
        raise CloudKeyError(f"the key file is for store {key.store_id}, bucket {key.bucket} holds another store")
    if not Sealer(key.key, key.store_id).checks(str(config.get("key_check", ""))):
        raise CloudKeyError(f"the key file does not open bucket {key.bucket}'s store: not its key")
    return config


def _refresh_points(index: Index, storage: ObjectStorage, sealer: Sealer) -> int:
    """Make the index's points the bucket's (a manifest another appliance wrote is read; one gone, dropped)."""
    listed = {o.key: o for o in storage.listing("points/")}
    known = {p.manifest: p for p in index.points()}
    for manifest in known.keys() - listed.keys():
        index.drop_point(manifest)
    for key in sorted(listed.keys() - known.keys()):
        sealed = storage.get(key, listed[key].version)
        point = _open_point(sealer, key, sealed)
        index.add_point(IndexedPoint(key, listed[key].version, point.host, point.point, point.created, None, sealed))
    return len(listed)


def _refresh_packs(index: Index, storage: ObjectStorage) -> None:
    known = {ref.name for ref, _, _ in index.packs()}
    for o in storage.listing("data/"):
        if o.key not in known:
            index.add_pack(PackRef(o.key, o.version, o.size), [], None, o.modified)


def _open_point(sealer: Sealer, key: str, sealed: bytes) -> CloudPoint:
    try:
        return open_manifest(sealer, sealed)
    except (SealError, ValueError) as exc:
        raise CloudObjectError(f"object {key} is damaged: the manifest does not open ({exc})") from exc


@dataclass
class Opened:
    """A store ready to use: its record, bucket and sealer."""

    store: CloudStore
    bucket: ObjectStorage
    sealer: Sealer


def open_store(home: Home, tools: Tools, name: str) -> Opened:
    store = records.load(home, name)
    return Opened(store, tools.bucket(access_of(home, store)), sealer_of(home, store))


# -- push ---------------------------------------------------------------------------------------------------


@dataclass
class PushReport:
    host: str
    point: str | None = None
    state: str = "sent"  # sent | current | no-points
    blocks: int = 0  # blocks of the point that hold data
    new_blocks: int = 0  # read and sent
    sent_bytes: int = 0  # bytes of objects put
    plain_bytes: int = 0  # the new blocks' own bytes
    packs: int = 0
    extended: int = 0  # locks extended on packs a newer point still needs
    seconds: float = 0.0


def push(home: Home, tools: Tools, name: str, only: str | None = None, say: Say = lambda _: None,
         wait: float = 0.0) -> list[PushReport]:  # fmt: skip
    """Send each host's newest point the bucket lacks; then apply the bucket's retention. `wait`: seconds
    to wait for another push to the store to end (the daemon's pushes after two hosts' points queue)."""
    opened = open_store(home, tools, name)
    names = [only] if only else [h.name for h in hosts.load_all(home)[0]]
    if only and not hosts.exists(home, only):
        raise HostNotFoundError(f"no host named {only!r}")
    reports = []
    with records.locked(home, name, "push", wait), Index(home, name) as index:
        aborted = opened.bucket.abort_uploads()
        if aborted:
            log.info("cloud.uploads_aborted", store=name, count=aborted)
        _refresh_points(index, opened.bucket, opened.sealer)
        pace = Pace(opened.store.bandwidth)
        for host in names:
            report = _push_host(home, tools, opened, index, host, pace)
            say(_push_line(report))
            reports.append(report)
        records.confirm(home, name, _newest_per_host(index))
        if opened.store.keep:
            for line in _prune(opened, index, dry_run=False):
                say(line)
    return reports


def _push_line(r: PushReport) -> str:
    if r.state != "sent":
        if r.state == "no-points":
            return f"{r.host}: nothing to push (no points)"
        return f"{r.host}: point {r.point} is already in the bucket"
    return (f"{r.host}: pushed point {r.point}: {r.new_blocks} of {r.blocks} blocks new, {_mib(r.sent_bytes)} sent "
            f"in {r.packs} pack(s), {r.extended} lock(s) extended, {r.seconds:.1f} s")  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _newest_per_host(index: Index) -> dict[str, str]:
    return {p.host: p.point for p in index.points()}  # ordered by creation: the last one per host wins


def _push_host(home: Home, tools: Tools, opened: Opened, index: Index, host_name: str, pace: Pace) -> PushReport:
    started = time.monotonic()
    report = PushReport(host_name)
    host = hosts.load(home, host_name)
    chain = catalog.load(home.chain_dir(host_name), host_name)
    live = [p for p in chain.points if not p.dropping]
    if not live:
        report.state = "no-points"
        return report
    point = live[-1]
    report.point = point.id
    in_bucket = [p for p in index.points(host_name)]
    if any(p.point == point.id and _same(opened.sealer, p, point) for p in in_bucket):
        report.state = "current"
        return report
    base = _open_point(opened.sealer, in_bucket[-1].manifest, in_bucket[-1].sealed) if in_bucket else None
    with ExitStack() as stack:
        files = _open_point_files(home, tools, host_name, point, opened.store.name, stack)
        sender = _Sender(opened, index, pace, report)
        maps = [sender.disk(d, files[d.slot], base) for d in point.disks]
        sender.flush()
    disks = [
        CloudDisk(d.slot, d.size, d.block_size, d.digest, m.runs()) for d, m in zip(point.disks, maps, strict=True)
    ]
    consistency = point.consistency.label if point.consistency else ""
    cloud_point = CloudPoint(host=host_name, point=point.id, created=point.created, pushed=_now(),
                             settings=replica.settings_of(host), consistency=consistency,
                             packs=tuple(sender.packs), disks=tuple(disks))  # fmt: skip
    _put_manifest(opened, index, cloud_point, report)
    report.extended = _extend_locks(opened, index, cloud_point)
    report.seconds = time.monotonic() - started
    log.info("cloud.pushed", store=opened.store.name, host=host_name, point=point.id, new_blocks=report.new_blocks,
             blocks=report.blocks, bytes=report.sent_bytes, packs=report.packs, extended=report.extended)  # fmt: skip
    return report


def _same(sealer: Sealer, indexed: IndexedPoint, point: Point) -> bool:
    pushed = open_manifest(sealer, indexed.sealed)
    return [d.digest for d in pushed.disks] == [d.digest for d in point.disks]


@dataclass
class _Files:
    exported: ExportedImage
    hashes: bytes


def _open_point_files(
    home: Home, tools: Tools, host: str, point: Point, store: str, stack: ExitStack
) -> dict[str, _Files]:
    """The point's exports and hash lists, opened under the host's lock; the point then stays held from
    merging (chains.sending) while the push reads it, and the host's other jobs go on."""
    out = {}
    with chains.open(home, tools.images, host, "cloud push", wait=600.0) as tx:
        if not any(p.id == point.id and not p.dropping for p in tx.chain.points):
            raise PointNotFoundError(f"{host}'s point {point.id} was merged away before the push began")
        folder = stack.enter_context(chains.sending(home, tools.images, host, point.id, f"cloud store {store}"))
        for d in point.disks:
            path = tx.hash_list(point.id, d.slot)
            if not path.exists():
                raise CloudError(f"{host}'s newest point {point.id} has no block hash list for {d.slot}",
                                 hint="the next backup of the host writes one; push after it")  # fmt: skip
            out[d.slot] = _Files(stack.enter_context(tools.images.export(tx.file(d.file), folder, writable=False)),
                                 path.read_bytes())  # fmt: skip
    return out


class _Sender:
    """Blocks the bucket lacks, sealed into packs and put as each pack fills."""

    def __init__(self, opened: Opened, index: Index, pace: Pace, report: PushReport) -> None:
        self.opened, self.index, self.pace, self.report = opened, index, pace, report
        self.packs: list[PackRef] = []
        self._numbers: dict[str, int] = {}
        self._writer: PackWriter | None = None
        self._name = ""
        self._pending: dict[bytes, int] = {}  # block id -> entry in the pack being filled

    def number(self, name: str, ref: PackRef | None = None) -> int:
        if name not in self._numbers:
            self._numbers[name] = len(self.packs)
            self.packs.append(ref or PackRef(name, None, 0))
        return self._numbers[name]

    def disk(self, disk: DiskPoint, files: _Files, base: CloudPoint | None) -> BlockMap:
        """The disk's block map: blocks the base point holds at the same place, blocks the bucket holds
        elsewhere, and the rest read from the point and sent."""
        total = block_count(disk.size, disk.block_size)
        hashes = files.hashes
        if len(hashes) != total * HASH_LEN:
            raise CloudError(f"the hash list of {disk.slot} has {len(hashes) // HASH_LEN} blocks, the disk {total}")
        new_map = BlockMap(total)
        ids: list[bytes | None] = []
        for b in range(total):
            h = hashes[b * HASH_LEN : (b + 1) * HASH_LEN]
            ids.append(
                None if is_zero_hash(h, block_length(b, disk.size, disk.block_size)) else self.opened.sealer.block_id(h)
            )
        self.report.blocks += sum(1 for i in ids if i is not None)
        missing = self._reuse_base(ids, new_map, base, disk)
        found = self.index.find({ids[b] for b in missing})  # type: ignore[misc]
        to_send = []
        for b in missing:
            hit = found.get(ids[b])  # type: ignore[arg-type]
            if hit is not None:
                ref = self.index.pack(hit[0])
                new_map.put(b, self.number(hit[0], ref), hit[1])
            else:
                to_send.append(b)
        self._send(files.exported, disk, to_send, ids, hashes, new_map)
        return new_map

    def _reuse_base(
        self, ids: list[bytes | None], new_map: BlockMap, base: CloudPoint | None, disk: DiskPoint
    ) -> list[int]:
        """Blocks whose id is the base point's same block's: the same pack entry. Returns the others."""
        base_disk = next((d for d in base.disks if d.slot == disk.slot), None) if base else None
        if base is None or base_disk is None or base_disk.block_size != disk.block_size:
            return [b for b, i in enumerate(ids) if i is not None]
        base_map = base.block_map(base_disk)
        pack_ids: dict[int, list[bytes]] = {}
        others = []
        for b, block_id in enumerate(ids):
            if block_id is None:
                continue
            pack, entry = base_map.get(b) if b < base_map.total else (ZERO, 0)
            if pack != ZERO:
                ref = base.packs[pack]
                if pack not in pack_ids:
                    pack_ids[pack] = self._pack_ids(ref)
                listed = pack_ids[pack]
                if entry < len(listed) and listed[entry] == block_id:
                    new_map.put(b, self.number(ref.name, ref), entry)
                    continue
            others.append(b)
        return others

    def _pack_ids(self, ref: PackRef) -> list[bytes]:
        ids = self.index.pack_ids(ref.name)
        if not ids:  # a pack this appliance did not write (attached store): its header, once
            entries = fetch_header(self.opened.bucket, self.opened.sealer, ref)
            self.index.add_pack(ref, entries, None, _now())
            ids = [e.block_id for e in entries]
        return ids

    def _send(self, exported: ExportedImage, disk: DiskPoint, blocks: list[int], ids: list[bytes | None],
              hashes: bytes, new_map: BlockMap) -> None:  # fmt: skip
        """Read the blocks (runs of neighbours in one read), check each against the point's hash list, seal
        it into the pack being filled; a full pack is put."""
        bs = disk.block_size
        for first, count in _runs(blocks, _READ_AT_ONCE):
            offset = first * bs
            length = min(count * bs, disk.size - offset)
            data = exported.read(offset, length)
            for b in range(first, first + count):
                chunk = data[(b - first) * bs : (b - first + 1) * bs]
                if hashlib.sha256(chunk).digest() != hashes[b * HASH_LEN : (b + 1) * HASH_LEN]:
                    raise CloudError(f"block {b} of {disk.slot} does not read back as the point recorded it",
                                     hint="run `appliance verify HOST` on the point")  # fmt: skip
                block_id = ids[b]
                assert block_id is not None
                new_map.put(b, *self._add(block_id, chunk))

    def _add(self, block_id: bytes, chunk: bytes) -> tuple[int, int]:
        if self._writer is None:
            self._writer = PackWriter(self.opened.sealer)
            self._name = f"data/{secrets.token_hex(16)}"
            self._pending = {}
        number = self.number(self._name)
        entry = self._pending.get(block_id)
        if entry is None:
            entry = self._writer.add(block_id, chunk)
            self._pending[block_id] = entry
            self.report.new_blocks += 1
            self.report.plain_bytes += len(chunk)
        if self._writer.size >= PACK_TARGET:
            self.flush()
        return number, entry

    def flush(self) -> None:
        """Put the pack being filled; it counts (index.sqlite) once the bucket acknowledged it."""
        writer, name = self._writer, self._name
        if writer is None or not writer.entries:
            return
        body = writer.finish(name)
        self.pace(len(body))
        now = _now()
        version = self.opened.bucket.put(name, body, _lock(self.opened.store, now))
        ref = PackRef(name, version, len(body))
        self.index.add_pack(ref, writer.entries, _lock_date(self.opened.store, now), now)
        self.packs[self._numbers[name]] = ref
        self.report.sent_bytes += len(body)
        self.report.packs += 1
        self._writer = None
        log.info("cloud.pack_put", store=self.opened.store.name, pack=name, bytes=len(body), blocks=len(writer.entries))


def _runs(blocks: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """(first, count) of stretches of consecutive blocks, at most `limit` long."""
    i = 0
    while i < len(blocks):
        first = blocks[i]
        count = 1
        while i + count < len(blocks) and blocks[i + count] == first + count and count < limit:
            count += 1
        yield first, count
        i += count


def _lock_date(store: CloudStore, now: datetime) -> datetime | None:
    return lock_until(now, store.lock_days) if store.lock_days else None


def _put_manifest(opened: Opened, index: Index, point: CloudPoint, report: PushReport) -> None:
    sealed = seal_manifest(opened.sealer, point)
    key = f"points/{secrets.token_hex(16)}"
    now = _now()
    version = opened.bucket.put(key, sealed, _lock(opened.store, now))
    index.add_point(IndexedPoint(key, version, point.host, point.point, point.created, _lock_date(opened.store, now),
                                 sealed))  # fmt: skip
    report.sent_bytes += len(sealed)


def _extend_locks(opened: Opened, index: Index, point: CloudPoint) -> int:
    """Every pack the new point needs stays locked at least lock_days from now (a base uploaded a year
    ago stays locked as long as a locked point needs it); extended by a generation at a time."""
    store = opened.store
    if not store.lock_days:
        return 0
    now = _now()
    locks = {ref.name: until for ref, until, _ in index.packs()}
    extended = 0
    for ref in point.packs:
        known = locks.get(ref.name)
        if known is None:  # a pack of an attached store: what the bucket says
            current = opened.bucket.lock_of(ref.name, ref.version)
            known = current.until if current else None
            if known is not None:
                index.set_pack_lock(ref.name, known)
        if needs_extension(known, now, store.lock_days):
            until = lock_until(now, store.lock_days)
            opened.bucket.extend_lock(ref.name, ref.version, ObjectLock(store.lock_mode, until))
            index.set_pack_lock(ref.name, until)
            extended += 1
    config = opened.bucket.lock_of(CONFIG, None)
    if needs_extension(config.until if config else None, now, store.lock_days):
        versions = [v for v in opened.bucket.versions(CONFIG) if v != "null"]
        opened.bucket.extend_lock(CONFIG, versions[0] if versions else None,
                                  ObjectLock(store.lock_mode, lock_until(now, store.lock_days)))  # fmt: skip
    return extended


def _now() -> datetime:
    return datetime.now(UTC)


# -- what the bucket holds ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BucketPoint:
    manifest: str
    point: CloudPoint
    lock: ObjectLock | None
    hidden: bool  # a delete marker is over its manifest (someone "deleted" it; the locked version is read)


def points(home: Home, tools: Tools, name: str, host: str | None = None) -> list[BucketPoint]:
    """The bucket's points (of `host`), read from the bucket itself, with each manifest's lock."""
    opened = open_store(home, tools, name)
    out = []
    with Index(home, name) as index:
        cached = {p.manifest: p for p in index.points()}
    for o in opened.bucket.listing("points/"):
        known = cached.get(o.key)
        sealed = (
            known.sealed if known is not None and known.version == o.version else opened.bucket.get(o.key, o.version)
        )
        point = _open_point(opened.sealer, o.key, sealed)
        if host is None or point.host == host:
            lock = opened.bucket.lock_of(o.key, o.version) if opened.store.lock_days else None
            out.append(BucketPoint(o.key, point, lock, o.hidden))
    return sorted(out, key=lambda p: (p.point.host, p.point.created, p.point.point))


@dataclass(frozen=True, slots=True)
class Located:
    opened: Opened
    point: CloudPoint
    manifest: str  # its object's key
    version: str | None


def locate(home: Home, tools: Tools, name: str, host: str, point_id: str | None) -> Located:
    """The bucket's point of `host` (its newest when `point_id` is None), as the bucket lists it now."""
    opened = open_store(home, tools, name)
    with Index(home, name) as index:
        _refresh_points(index, opened.bucket, opened.sealer)
        listed = index.points(host)
    if point_id is not None:
        listed = [p for p in listed if p.point == point_id]
    if not listed:
        what = f"no point {point_id} of {host}" if point_id else f"no point of {host}"
        raise PointNotFoundError(f"cloud store {name} holds {what}",
                                 hint=f"`appliance cloud points {name}` lists what it holds")  # fmt: skip
    chosen = listed[-1]
    return Located(opened, _open_point(opened.sealer, chosen.manifest, chosen.sealed), chosen.manifest, chosen.version)


# -- verify -------------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    points: int = 0
    packs: int = 0
    blocks: int = 0  # blocks opened and checked (--deep)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(home: Home, tools: Tools, name: str, host: str | None = None, deep: bool = False,
           say: Say = lambda _: None) -> VerifyReport:  # fmt: skip
    """Every manifest opens, every pack it names is there with a header that opens and holds its entries;
    --deep: every block of every point is read, opened, checked against its id, and each disk's digest
    recomputed from them (the same digest `appliance verify` checks locally)."""
    opened = open_store(home, tools, name)
    report = VerifyReport()
    data = {o.key: o for o in opened.bucket.listing("data/")}
    headers = PackHeaders(opened.bucket, opened.sealer)
    for o in opened.bucket.listing("points/"):
        try:
            point = _open_point(opened.sealer, o.key, opened.bucket.get(o.key, o.version))
        except CloudObjectError as exc:
            report.problems.append(str(exc))
            continue
        if host is not None and point.host != host:
            continue
        report.points += 1
        if o.hidden:
            report.warnings.append(f"manifest {o.key} ({point.host} {point.point}) is behind a delete marker")
        problems = _check_point(opened, point, data, headers, report, deep)
        report.problems += problems
        say(f"{point.host} {point.point}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    log.info("cloud.verified", store=name, host=host, deep=deep, points=report.points, problems=len(report.problems))
    return report


def _check_point(opened: Opened, point: CloudPoint, data: dict[str, Any], headers: PackHeaders,
                 report: VerifyReport, deep: bool) -> list[str]:  # fmt: skip
    problems = []
    for ref in point.packs:
        listed = data.get(ref.name)
        if listed is None:
            problems.append(f"object {ref.name} is missing ({point.host} {point.point} needs it)")
            continue
        if listed.hidden:
            report.warnings.append(f"object {ref.name} is behind a delete marker (its locked version is read)")
        if ref.version is not None and listed.version != ref.version:
            report.warnings.append(f"object {ref.name} has a newer version than the one written (ignored: "
                                   "reads ask for the version written)")  # fmt: skip
        try:
            headers.entries(ref)
            report.packs += 1
        except CloudError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    for disk in point.disks:
        try:
            reader = DiskReader(opened.bucket, opened.sealer, point, disk, headers)
            for _first, count, pack, entry in reader.map.stretches():
                if entry + count > len(headers.entries(point.packs[pack])):
                    problems.append(f"object {point.packs[pack].name} lacks entries {point.host} {point.point} needs")
            if deep and not problems:
                digest = _deep_digest(reader, report)
                if digest != disk.digest:
                    problems.append(f"{point.host} {point.point} {disk.slot}: the blocks read back do not make the "
                                    "point's digest")  # fmt: skip
        except CloudError as exc:
            problems.append(str(exc))
    return problems


def _deep_digest(reader: DiskReader, report: VerifyReport) -> str:
    def count(_: int, __: bytes, zero: bool) -> None:
        report.blocks += not zero

    return _each_block(reader, count)


# -- restore ------------------------------------------------------------------------------------------------


def restore(home: Home, tools: Tools, name: str, host: str, point_id: str | None, target: Path,
            say: Say = lambda _: None) -> tuple[CloudPoint, int]:  # fmt: skip
    """Write a point's first disk (or each disk, to TARGET.N for disk N > 0) as raw bytes to a file or a
    block device; returns the point and the bytes fetched. Zero blocks are written only to a device."""
    located = locate(home, tools, name, host, point_id)
    opened, point = located.opened, located.point
    headers = PackHeaders(opened.bucket, opened.sealer)
    fetched = 0
    for i, disk in enumerate(point.disks):
        path = target if i == 0 else target.with_name(f"{target.name}.{i}")
        reader = DiskReader(opened.bucket, opened.sealer, point, disk, headers)
        _write_disk(reader, path)
        fetched += reader.fetched_bytes
        say(f"{disk.slot} -> {path}: {disk.size} bytes, {_mib(reader.fetched_bytes)} fetched")
    return point, fetched


def _write_disk(reader: DiskReader, path: Path) -> None:
    """To a file (sparse: zero blocks are not written) or a block device (every block)."""
    is_device = path.exists() and path.is_block_device()
    try:
        with open(path, "r+b" if is_device else "wb") as out:
            if not is_device:
                out.truncate(reader.disk.size)

            def write(offset: int, data: bytes) -> None:
                out.seek(offset)
                out.write(data)

            _copy_checked(reader, write, zeroes=is_device)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise ConfigError(f"cannot write the restore to {path} ({exc.strerror})") from exc


def _copy_checked(reader: DiskReader, write: Callable[[int, bytes], None], *, zeroes: bool) -> None:
    """Every block in order through `write`, checked as a whole against the point's digest: a restore is
    done only when what it wrote is the point, byte for byte."""

    def take(block: int, data: bytes, zero: bool) -> None:
        if not zero or zeroes:
            write(block * reader.disk.block_size, data)

    if _each_block(reader, take) != reader.disk.digest:
        raise CloudObjectError(f"the restored {reader.disk.slot} of {reader.point.host} does not make the point's "
                               "digest",
                               hint="`appliance cloud verify STORE --deep` names the damaged object")  # fmt: skip


def _each_block(reader: DiskReader, take: Callable[[int, bytes, bool], None]) -> str:
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


def restore_to_store(home: Home, tools: Tools, name: str, host_name: str, point_id: str | None,
                     say: Say = lambda _: None) -> Point:  # fmt: skip
    """Bring a bucket's point back as the newest point of the host's local chain (a new appliance after a
    disaster: backups go on from it, incremental, and it fails over locally). The disks are written through
    QEMU into a scratch qcow2 and checked against the point's digest, then taken in as a backup takes a
    point in: only the blocks that differ from the chain's newest point are written."""
    located = locate(home, tools, name, host_name, point_id)
    point = located.point
    host = cloud_host(home, host_name, name, point.settings)
    headers = PackHeaders(located.opened.bucket, located.opened.sealer)
    with chains.open(home, tools.images, host_name, "cloud restore", wait=60.0) as tx:
        if any(p.id == point.point for p in tx.chain.points):
            raise ConfigError(f"{host_name} already has point {point.point} here")
        sources = []
        for index, disk in enumerate(point.disks):
            scratch = tx.run_dir / f"cloud-{disk.slot}.qcow2"
            scratch.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tools.images.create(scratch, disk.size)
            reader = DiskReader(located.opened.bucket, located.opened.sealer, point, disk, headers)
            with tools.images.export(scratch, tx.run_dir, writable=True) as exported:
                _copy_checked(reader, exported.write, zeroes=False)
                exported.flush()
            say(f"{disk.slot}: {_mib(reader.fetched_bytes)} fetched, digest checked")
            source = host.disks[index] if index < len(host.disks) else disk.slot
            sources.append((source, scratch, disk.size))
        made = record_point(tx, Import(tx, tools, host, sources, f"cloud store {name}",
                                       point=(point.point, point.created)), "cloud restore")  # fmt: skip
        for scratch_file in (s[1] for s in sources):
            scratch_file.unlink(missing_ok=True)
    if [d.digest for d in made.disks] != [d.digest for d in point.disks]:
        raise CloudObjectError(f"{host_name}'s restored point {made.id} does not read back as the bucket's")
    log.info("cloud.restored_to_store", store=name, host=host_name, point=made.id)
    return made


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


# -- the bucket's retention ---------------------------------------------------------------------------------


def prune(home: Home, tools: Tools, name: str, dry_run: bool = False) -> list[str]:
    opened = open_store(home, tools, name)
    if not opened.store.keep:
        raise ConfigError(
            f"cloud store {name} has no retention policy", hint=f"`appliance cloud set {name} --keep-daily 30 ...`"
        )
    with records.locked(home, name, "prune"), Index(home, name) as index:
        _refresh_points(index, opened.bucket, opened.sealer)
        return _prune(opened, index, dry_run)


def _prune(opened: Opened, index: Index, dry_run: bool) -> list[str]:
    """Drop the manifests the bucket's policy does not keep (once their lock lets go), then delete packs no
    manifest needs (once theirs does). A locked object is never asked to be deleted: it waits."""
    policy = RetentionPolicy(**(opened.store.keep or {}))
    now = _now()
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
                _delete_all(opened.bucket, p.manifest)
                index.drop_point(p.manifest)
    needed = set()
    for p in index.points():
        needed |= {ref.name for ref in _open_point(opened.sealer, p.manifest, p.sealed).packs}
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
            _delete_all(opened.bucket, ref.name)
            index.drop_pack(ref.name)
        freed += ref.size
    if freed:
        lines.append(f"{'would free' if dry_run else 'freed'} {_mib(freed)} of packs no point needs")
    log.info("cloud.pruned", store=opened.store.name, dry_run=dry_run, lines=len(lines), freed=freed)
    return lines


def _delete_all(bucket: ObjectStorage, key: str) -> None:
    """Every version of the object (a delete without one only hides it behind a marker)."""
    versions: list[str | None] = [None if v == "null" else v for v in bucket.versions(key)]
    for version in versions or [None]:
        bucket.delete(key, version)
