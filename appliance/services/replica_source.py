# SPDX-License-Identifier: GPL-2.0-or-later
"""The source side of replication: what `appliance serve-replica` answers a DR site (transfer/replica.py).

It runs as the forced command of the key `site grant` installed: it reads requests on stdin and writes
records on stdout, lists the hosts and points, and sends a point as the blocks the DR site lacks. Which
blocks those are comes from the hash lists both appliances keep: the point's own list against the DR
site's newest point (the same point here, when this appliance still holds it, or the hashes the DR
site sends): no disk is read whole, only the blocks that differ, from the point's qcow2 through QEMU.
It writes nothing to the store but which point each DR site confirmed holding (granted/<site>.json:
kept from merging), and it names hosts and points only as the catalog lists them.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.agent import wire
from appliance.domain.blocks import HASH_LEN, carry_over, changed_runs, zero_prefix
from appliance.domain.models import HOST_NAME, DiskPoint, Point
from appliance.errors import ApplianceError
from appliance.log import get_logger
from appliance.ports import ExportedImage, Tools
from appliance.services.pipeline import HeldHashes, PreviousHashes
from appliance.store import catalog, chains, hosts, sites
from appliance.store.chains import ChainTx
from appliance.store.layout import Home
from appliance.transfer import replica
from appliance.transfer.protocol import ProtocolError

log = get_logger(__name__)

_BLOCKS_AT_ONCE = 256  # hash-list entries compared at a time


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Refusals of one point that leave the session as it was (nothing of the point was sent): the DR site
# skips that point and asks for the next one on the same session.
_POINT_REFUSALS = ("no-point", "no-hashes")


def serve(home: Home, tools: Tools, stdin: BinaryIO, stdout: BinaryIO, site: str) -> int:
    """Answer requests until the DR site closes the session. Returns the exit status."""
    out = _Out(stdout)
    try:
        while (request := replica.read_request(stdin.read)) is not None:
            try:
                _answer(home, tools, request, stdin, out, site)
            except _Refused as exc:
                if exc.code not in _POINT_REFUSALS:
                    raise
                log.info("replica.point_refused", site=site, code=exc.code, error=str(exc))
                out.send(replica.record(b"X", {"code": exc.code, "message": str(exc)}))
    except (_Refused, ProtocolError, ApplianceError) as exc:
        code = exc.code if isinstance(exc, _Refused) else "protocol" if isinstance(exc, ProtocolError) else "error"
        message = exc.message if isinstance(exc, ApplianceError) else str(exc)
        log.warning("replica.refused", site=site, code=code, error=message)
        out.send(replica.record(b"X", {"code": code, "message": message}))
        return 3
    except (BrokenPipeError, wire.Hangup):
        return 4
    return 0


def _answer(home: Home, tools: Tools, request: dict[str, Any], stdin: BinaryIO, out: _Out, site: str) -> None:
    op = request.get("op")
    if op == "catalog":
        out.send(replica.record(b"C", _catalog(home)))
    elif op == "point":
        name, point_id, base = request.get("host"), request.get("point"), request.get("base")
        if not isinstance(name, str) or not HOST_NAME.match(name) or not hosts.exists(home, name):
            raise _Refused("no-host", f"this appliance has no host {str(name)[:64]!r}")
        if not isinstance(point_id, str) or (base is not None and not isinstance(base, dict)):
            raise _Refused("protocol", "a point request without a point id")
        resume = _resume_at(request.get("resume"))
        out.packer = replica.DataPacker() if request.get("compress") == replica.COMPRESS else None
        with ExitStack() as stack:
            _send_point(_open_send(home, tools, name, point_id, base, resume, site, stack), stdin, out)
        if out.packer is not None:
            log.info("replica.compressed", site=site, host=name, point=point_id, data=out.packer.raw,
                     sent=out.packer.sent)  # fmt: skip
    elif op == "confirm":  # the DR site published these points: keep its newest from merging
        _confirm(home, request.get("held"), site)
    else:
        raise _Refused("protocol", f"no such request {str(op)[:40]!r}")


def _resume_at(resume: object) -> tuple[int, int]:
    """(disk, block) a DR site asks to go on from (what it kept of a cut pull); (0, 0) for the whole point."""
    if resume is None:
        return 0, 0
    fields = ("disk", "block")
    if not isinstance(resume, dict) or not all(type(resume.get(k)) is int and resume[k] >= 0 for k in fields):
        raise _Refused("protocol", "a resume that is not a disk and a block")
    return resume["disk"], resume["block"]


def _confirm(home: Home, held: object, site: str) -> None:
    """{host: {"id", "digests"}}: what the DR site now holds; recorded where this appliance has that point."""
    if not isinstance(held, dict):
        raise _Refused("protocol", "a confirmation without the points held")
    for name, base in held.items():
        if isinstance(name, str) and HOST_NAME.match(name) and hosts.exists(home, name) and isinstance(base, dict):
            point = _base_here(catalog.load(home.chain_dir(name), name).points, base)
            if point is not None:
                sites.confirm(home, site, name, point.id)


def _catalog(home: Home) -> dict[str, Any]:
    listed = []
    for host in hosts.load_all(home)[0]:
        if host.replica_of:
            continue  # a replica here is not this site's to pass on
        settings = replica.settings_of(host)
        chain = catalog.load(home.chain_dir(host.name), host.name)
        listed.append((host.name, settings, [p for p in chain.points if not p.dropping]))
    return replica.catalog_doc(listed)


@dataclass(frozen=True, slots=True)
class _DiskSend:
    disk: DiskPoint
    start: int  # the first block to compare (a resumed pull has the ones before)
    exported: ExportedImage
    hash_list: BinaryIO  # the point's
    held: HeldHashes | None  # the DR site's newest point's hashes here; None: the DR site streams them


@dataclass(frozen=True, slots=True)
class _Send:
    host: str
    site: str
    point: Point
    base: Point | None  # the DR site's newest point, when this appliance holds it
    disks: list[_DiskSend]
    resume: tuple[int, int]


def _open_send(home: Home, tools: Tools, name: str, point_id: str, base: dict[str, Any] | None,
               resume: tuple[int, int], site: str, stack: ExitStack) -> _Send:  # fmt: skip
    """Check the point and open everything its send reads, under the host's lock; the lock is then let go
    (a send over a slow link may take hours: the host's backups and merges go on meanwhile). What the send
    reads stays as it was: its files are open (a merge renames files and only adds clusters a newer point
    shadows, see store/chains.py), and the point itself is held from being merged while the send lasts
    (`chains.sending`)."""
    with chains.open(home, tools.images, name, "replication", wait=600.0) as tx:
        point = next((p for p in tx.chain.points if p.id == point_id and not p.dropping), None)
        if point is None:
            raise _Refused("no-point", f"{name} has no point {point_id[:40]!r} here (merged away, or never taken)")
        if not replica.within(point.disks, resume):
            raise _Refused("protocol", f"a resume at disk {resume[0]} block {resume[1]}, past the point's end")
        if any(not tx.hash_list(point.id, d.slot).exists() for d in point.disks):
            raise _Refused("no-hashes", f"{name}'s point {point.id} has no block hash lists here any more")
        held_point = _base_here(tx.chain.points, base)
        if held_point is not None:
            sites.confirm(tx.home, site, name, held_point.id)
            if any(not tx.hash_list(held_point.id, d.slot).exists() for d in held_point.disks):
                held_point = None  # the DR site sends the hashes of what it holds instead
        folder = stack.enter_context(chains.sending(home, tools.images, name, point.id, site))
        disks = []
        for index, disk in enumerate(point.disks[resume[0] :], start=resume[0]):
            held = _held_here(tx, held_point, disk) if held_point is not None else None
            if isinstance(held, PreviousHashes):
                stack.callback(held.close)
            hash_list = stack.enter_context(open(tx.hash_list(point.id, disk.slot), "rb"))  # noqa: SIM115
            exported = stack.enter_context(tools.images.export(tx.file(disk.file), folder, writable=False))
            disks.append(_DiskSend(disk, resume[1] if index == resume[0] else 0, exported, hash_list, held))
    return _Send(name, site, point, held_point, disks, resume)


def _send_point(send: _Send, stdin: BinaryIO, out: _Out) -> None:
    """The point's blocks the DR site lacks, from `send.resume` (disk, block) on: the blocks before it
    arrived in a pull that was cut."""
    point = send.point
    out.send(replica.record(b"H", {
        "protocol": wire.PROTOCOL, "python": "appliance", "base_known": send.base is not None,
        "disks": [{"path": d.source, "size": d.size, "kind": "replica"} for d in point.disks],
    }))  # fmt: skip
    old = wire.OldHashes(stdin)
    sent = 0
    for d in send.disks:
        sent += _send_disk(d, d.held or _StreamedHeld(old, d.disk), out)
    out.send(replica.record(b"F", {"post_hook": None}))
    log.info("replica.sent", site=send.site, host=send.host, point=point.id, base=send.base.id if send.base else None,
             bytes=sent, resumed_at=list(send.resume) if send.resume != (0, 0) else None)  # fmt: skip


def _base_here(points: tuple[Point, ...], base: dict[str, Any] | None) -> Point | None:
    """The DR site's newest point, if this appliance holds it with the same content (same digests)."""
    if base is None:
        return None
    return next((p for p in points if not p.dropping and replica.point_ref(p) == base), None)


def _held_here(tx: ChainTx, base: Point, disk: DiskPoint) -> HeldHashes:
    if not any(d.slot == disk.slot for d in base.disks) or base.disk(disk.slot).block_size != disk.block_size:
        return PreviousHashes(None, carry_over(None, disk.size, disk.block_size), disk.size, disk.block_size)
    old = base.disk(disk.slot)
    carry = carry_over(old.size, disk.size, disk.block_size)
    return PreviousHashes(tx.hash_list(base.id, disk.slot), carry, disk.size, disk.block_size)


class _StreamedHeld:
    """What the DR site holds, as it streams it (the reader's old-hash runs), read in block order."""

    def __init__(self, old: wire.OldHashes, disk: DiskPoint) -> None:
        self.old, self.disk = old, disk

    def held(self, first: int, count: int) -> list[bytes | None]:
        _, entries = self.old.take(count)
        out: list[bytes | None] = []
        for j, entry in enumerate(entries):
            if entry is None:  # reads as zeroes there
                out.append(zero_prefix(first + j, self.disk.size, self.disk.block_size))
            else:
                out.append(entry or None)  # b'': unknown, sent whatever it is
        return out


def _send_disk(d: _DiskSend, held: HeldHashes, out: _Out) -> int:
    """The disk's blocks from `d.start` on that the DR site lacks, as D and Z records in block order, then
    its E record."""
    disk = d.disk
    bs, size = disk.block_size, disk.size
    sent = 0
    d.hash_list.seek(d.start * HASH_LEN)
    first = d.start
    while chunk := d.hash_list.read(_BLOCKS_AT_ONCE * HASH_LEN):
        count = len(chunk) // HASH_LEN
        for run in changed_runs(first, chunk, held.held(first, count), size, bs):
            if run.zero:
                out.send(wire.ZERO.pack(b"Z", run.first, run.count))
                continue
            hashes = chunk[(run.first - first) * HASH_LEN : (run.first - first + run.count) * HASH_LEN]
            sent += _send_data(d.exported, run.first, run.count, hashes, disk, out)
        first += count
    out.send(wire.END.pack(b"E", size) + bytes.fromhex(disk.digest))
    return sent


def _send_data(exported: ExportedImage, first: int, count: int, hashes: bytes, disk: DiskPoint, out: _Out) -> int:
    """D records of at most MAX_RUN bytes each (the reader's own limit, which the DR site enforces), or K
    records (compressed) where the DR site asked for them and they pay."""
    bs = disk.block_size
    per_record = max(wire.MAX_RUN // bs, 1)
    sent = 0
    for start in range(first, first + count, per_record):
        n = min(per_record, first + count - start)
        length = min(n * bs, disk.size - start * bs)
        data = exported.read(start * bs, length)
        piece = hashes[(start - first) * HASH_LEN : (start - first + n) * HASH_LEN]
        if out.packer is not None:
            out.send(*out.packer.record(start, length, piece, data))
        else:
            out.send(wire.DATA.pack(b"D", start, length) + piece, data)
        sent += length
    return sent


class _Out:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.packer: replica.DataPacker | None = None  # the current point request asked for compression

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.stream.write(piece)
        self.stream.flush()
