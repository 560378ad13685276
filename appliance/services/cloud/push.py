# SPDX-License-Identifier: GPL-2.0-or-later
"""`cloud push`: each host's newest point the bucket lacks, sent as sealed packs of only the blocks it lacks.

Its blocks are compared, by id, with the host's newest point in the bucket (domain/cloud.py for the layout,
transfer/sealed.py for the sealing); only blocks the bucket does not hold are read (through QEMU, from the
point's qcow2 chain), checked against the point's hash list, sealed, packed and uploaded. A pack counts once
the bucket acknowledged it (index.sqlite): a push killed at any moment goes on with the blocks it had not
sent. The point's manifest is written last: a point is in the bucket once its manifest is. Then every pack
the point needs is locked at least `lock_days` from now, and the bucket's retention applied (bucket.py).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

from appliance.domain.blocks import HASH_LEN, block_count, block_length, is_zero_hash
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
from appliance.domain.models import DiskPoint, Point
from appliance.errors import CloudError, HostNotFoundError, PointNotFoundError
from appliance.log import get_logger
from appliance.ports import ExportedImage, ObjectLock, Tools
from appliance.services.cloud.bucket import (
    CONFIG,
    Opened,
    Say,
    apply_retention,
    lock_date,
    mib,
    new_lock,
    open_point,
    open_store,
    refresh_points,
    utc_now,
)
from appliance.services.cloud_reader import fetch_header
from appliance.services.pipeline import Pace
from appliance.store import catalog, chains, hosts
from appliance.store import cloud as records
from appliance.store.cloud import Index, IndexedPoint
from appliance.store.layout import Home
from appliance.transfer import replica
from appliance.transfer.sealed import PackWriter, Sealer, open_manifest, seal_manifest

log = get_logger(__name__)

_READ_AT_ONCE = 32  # blocks read from a point's export in one go (1 MiB at 32 KiB)


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
        refresh_points(index, opened.bucket, opened.sealer)
        pace = Pace(opened.store.bandwidth)
        for host in names:
            report = _push_host(home, tools, opened, index, host, pace)
            say(_push_line(report))
            reports.append(report)
        records.confirm(home, name, _newest_per_host(index))
        if opened.store.keep:
            for line in apply_retention(opened, index, dry_run=False):
                say(line)
    return reports


def _push_line(r: PushReport) -> str:
    if r.state != "sent":
        if r.state == "no-points":
            return f"{r.host}: nothing to push (no points)"
        return f"{r.host}: point {r.point} is already in the bucket"
    return (f"{r.host}: pushed point {r.point}: {r.new_blocks} of {r.blocks} blocks new, {mib(r.sent_bytes)} sent "
            f"in {r.packs} pack(s), {r.extended} lock(s) extended, {r.seconds:.1f} s")  # fmt: skip


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
    base = open_point(opened.sealer, in_bucket[-1].manifest, in_bucket[-1].sealed) if in_bucket else None
    with ExitStack() as stack:
        files = _open_point_files(home, tools, host_name, point, opened.store.name, stack)
        sender = _Sender(opened, index, pace, report)
        maps = [sender.disk(d, files[d.slot], base) for d in point.disks]
        sender.flush()
    disks = [
        CloudDisk(d.slot, d.size, d.block_size, d.digest, m.runs()) for d, m in zip(point.disks, maps, strict=True)
    ]
    consistency = point.consistency.label if point.consistency else ""
    cloud_point = CloudPoint(host=host_name, point=point.id, created=point.created, pushed=utc_now(),
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
            self.index.add_pack(ref, entries, None, utc_now())
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
        now = utc_now()
        version = self.opened.bucket.put(name, body, new_lock(self.opened.store, now))
        ref = PackRef(name, version, len(body))
        self.index.add_pack(ref, writer.entries, lock_date(self.opened.store, now), now)
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


def _put_manifest(opened: Opened, index: Index, point: CloudPoint, report: PushReport) -> None:
    sealed = seal_manifest(opened.sealer, point)
    key = f"points/{secrets.token_hex(16)}"
    now = utc_now()
    version = opened.bucket.put(key, sealed, new_lock(opened.store, now))
    index.add_point(IndexedPoint(key, version, point.host, point.point, point.created, lock_date(opened.store, now),
                                 sealed))  # fmt: skip
    report.sent_bytes += len(sealed)


def _extend_locks(opened: Opened, index: Index, point: CloudPoint) -> int:
    """Every pack the new point needs stays locked at least lock_days from now (a base uploaded a year
    ago stays locked as long as a locked point needs it); extended by a generation at a time."""
    store = opened.store
    if not store.lock_days:
        return 0
    now = utc_now()
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
