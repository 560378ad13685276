# SPDX-License-Identifier: GPL-2.0-or-later
"""Capture: one new recovery point of every disk of a host, pulled over SSH.

The flow is one way: the reader on the host (source) -> the wire (transfer) -> new qcow2 overlays
written through qemu-storage-daemon -> the chain's transaction (store/chains.py), which publishes the
point atomically: a run interrupted anywhere leaves the chain exactly as it was.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from appliance.agent import wire
from appliance.domain.blocks import Carry, block_hashes, carry_over
from appliance.domain.models import Consistency, DiskPoint, Host, Point, format_size, point_id_for, slot_name
from appliance.errors import (
    ApplianceError,
    ChainCorruptError,
    ConfigError,
    ConnectionLostError,
    DiskAccessError,
    JobDeadlineError,
    ProtocolViolationError,
    RemoteCommandError,
)
from appliance.faults import checkpoint, pause
from appliance.log import get_logger
from appliance.ports import RemoteStream, Tools
from appliance.services import reader_pool
from appliance.services.image_reader import read_chunks
from appliance.services.pipeline import OverlaySink, PreviousHashes, copy_changes
from appliance.services.reader_pool import KeptReader, ReaderPool
from appliance.services.reader_session import ended_early, violation
from appliance.store import chains, hosts
from appliance.store.chains import ChainTx, NewPoint
from appliance.store.files import full_disk_as_store_full
from appliance.store.hashes import HashListWriter, iter_chunks
from appliance.store.layout import Home
from appliance.transfer import protocol
from appliance.transfer.protocol import (
    DataRun,
    DiskEnd,
    Finished,
    Hello,
    Moment,
    Progress,
    RemoteFailure,
    Repass,
    ZeroRun,
)

log = get_logger(__name__)

# What a job's deadline allows beyond reading its disks at the host's minimum rate, for what does not grow
# with the disks: the session, the interpreter's start, the reader's code and its hello (~1 s measured).
STARTUP_SECONDS = 10.0


def job_deadline(host: Host, started: float, total: int) -> float:
    """When a backup that started at `started` (time.monotonic()) and reads `total` bytes must be over.

    `total` bytes at the host's minimum rate, plus STARTUP_SECONDS, plus one silence period (the host's
    timeout) for each hook and one more: a hook, or a pause of a busy disk, may keep the line silent for
    up to the timeout without the connection counting as lost, so a sound host that pauses at each of
    these still ends in time, while a host that trickles a byte just often enough never to look silent
    ends at the deadline instead of holding the daemon (and its other hosts) for ever.
    """
    hooks = bool(host.pre_hook) + bool(host.post_hook)
    return started + STARTUP_SECONDS + host.timeout * (1 + hooks) + total / max(host.min_rate, 1)


class _HashCheck:
    """Every data block the host sends is hashed again here and must match the hash the host sent with
    it: the hash list and the digest a point is proven by are built from the host's hashes, so a host
    that sent other data (a fault, a compromise) would otherwise publish a point that only `verify`
    could expose. sha256 releases the GIL: the check runs on worker threads beside the writes, a
    bounded number of records behind (a record is at most 1 MiB)."""

    AHEAD = 8

    def __init__(self, host: Host) -> None:
        self.host = host
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hash-check")
        self._pending: deque[tuple[int, Future[bool]]] = deque()

    def submit(self, record: DataRun, block_size: int) -> None:
        self._pending.append((record.first, self._pool.submit(_matches, record.data, record.hashes, block_size)))
        while len(self._pending) > self.AHEAD:
            self._settle()

    def drain(self) -> None:
        while self._pending:
            self._settle()

    def _settle(self) -> None:
        first, matches = self._pending.popleft()
        if not matches.result():
            raise violation(self.host, f"data for blocks from {first} that does not match the hashes sent with it")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _matches(data: memoryview, hashes: bytes, block_size: int) -> bool:
    return block_hashes(data, block_size) == hashes


@dataclass(slots=True)
class BackupProgress:
    """What a progress bar shows: bytes read on the host, bytes received, since when."""

    total: int = 0
    read: int = 0
    received: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.read / max(time.monotonic() - self.started, 1e-6)


ProgressFn = Callable[[BackupProgress], None]


def back_up(
    home: Home, tools: Tools, name: str, *, progress: ProgressFn | None = None, pool: ReaderPool | None = None
) -> Point:
    """Take one recovery point of host `name` now and append it to its chain. With a `pool` (the daemon's),
    the host's reader stays running afterwards and the next point reads only the blocks written meanwhile.

    :raises ChainLockedError: another job works on this host.
    :raises RemoteError, StoreFullError, ImageToolError: the point was not taken; the chain is unchanged.
    """
    host = hosts.load(home, name)
    if host.replica_of:
        raise ConfigError(
            f"{name} is a replica of site {host.replica_of}: its points come from there",
            hint=f"`appliance replicate {host.replica_of} {name}` pulls its newest points",
        )
    with chains.open(home, tools.images, name, "backup") as tx:
        return record_point(tx, Capture(tx, tools, host, progress, pool), "backup")


def import_point(tx: ChainTx, tools: Tools, host: Host, sources: list[tuple[str, Path, int]], origin: str) -> Point:
    """Append a point whose disks are local qcow2 images, e.g. a recovery VM's final state after failback.

    The caller holds the host's chain. `sources`: (the disk's path on the host, the image, its size) in
    the host's disk order. Only blocks that differ from the newest point are written, exactly as a
    backup would write them.
    """
    return record_point(tx, Import(tx, tools, host, sources, origin), "failback")


class _PointWriter(Protocol):
    draft: NewPoint

    def run(self, started: float) -> Point: ...


def record_point(tx: ChainTx, writer: _PointWriter, purpose: str) -> Point:
    """Write a new point and publish it last in the chain."""
    previous = tx.chain.newest
    log.info("backup.started", host=tx.host, previous=previous.id if previous else None, purpose=purpose)
    with full_disk_as_store_full(f"{tx.host}'s new point"):  # the hash lists are written here
        point = writer.run(time.monotonic())
    tx.publish(writer.draft, point)
    log.info("point.created", host=tx.host, point=point.id, depth=len(tx.chain.points), seconds=round(point.seconds, 2),
             changed=point.changed_bytes, sent=point.sent_bytes, wire=point.wire_bytes, purpose=purpose)  # fmt: skip
    return point


class Capture:
    """One run of the reader on the host and the writes it causes on the appliance."""

    def __init__(
        self, tx: ChainTx, tools: Tools, host: Host, progress: ProgressFn | None = None, pool: ReaderPool | None = None,
        *, point: tuple[str, datetime] | None = None,
    ) -> None:  # fmt: skip
        """`point`: the new point's id and time when they are not now's (a replicated point keeps its own)."""
        self.tx = tx
        self.tools = tools
        self.host = host
        self.chain = tx.chain
        self.progress_fn = progress or (lambda _: None)
        self.progress = BackupProgress()
        self.created = point[1] if point else datetime.now(UTC)
        self.draft = tx.new_point(point[0] if point else point_id_for(self.created, self.chain.ids()))
        self.started = time.monotonic()
        self.deadline = float("inf")
        self._sender_error: BaseException | None = None
        self.moment: Moment | None = None
        self.pool = pool
        self.hello_seen = False

    # -- the run --------------------------------------------------------------------------------------

    def run(self, started: float) -> Point:
        kept = self.pool.take(self.host) if self.pool is not None else None
        if kept is not None:
            try:
                return self._run_on(kept, started)
            except ConnectionLostError:
                if self.hello_seen:
                    raise
                log.info("backup.kept_reader_gone", host=self.host.name)  # it died while idle: start a new one
        return self._run_on(reader_pool.start(self.tools, self.host), started)

    def _run_on(self, kept: KeptReader, started: float) -> Point:
        stream = kept.stream
        sent, received = stream.bytes_sent, stream.bytes_received
        newest = self.chain.newest
        try:
            disks = self._exchange(stream, started, kept.tracks_from(newest.id if newest else None))
        except BaseException:
            kept.close()
            raise
        wire = stream.bytes_sent - sent + stream.bytes_received - received
        if self.pool is not None and self.moment is not None:
            kept.token, kept.point_id = self.moment.token, self.draft.id
            self.pool.keep(kept)
        else:
            kept.close()
        return Point(
            id=self.draft.id,
            created=self.created,
            seconds=time.monotonic() - started,
            disks=tuple(disks),
            wire_bytes=wire,
            consistency=self._consistency(),
        )

    def _consistency(self) -> Consistency:
        """What the reader made of the point; a live read says so in the log, naming what was missing."""
        moment = self.moment
        if moment is None:
            raise violation(self.host, "no moment record")
        if moment.kind == "live":
            log.warning("backup.live_read", host=self.host.name, missing=moment.detail)
        elif moment.detail:
            log.warning("backup.not_all_frozen", host=self.host.name, detail=moment.detail)
        log.info("backup.moment", host=self.host.name, kind=moment.kind, frozen_seconds=moment.seconds,
                 passes=moment.passes, reread=sum(moment.reread), timings=moment.timings,
                 snapshots=list(moment.snapshots) or None)  # fmt: skip
        return Consistency(kind=moment.kind, seconds=moment.seconds, detail=moment.detail, passes=moment.passes)

    def _exchange(self, stream: RemoteStream, started: float, track_from: str | None) -> list[DiskPoint]:
        self.started = started
        block_sizes = [self._block_size(slot_name(i)) for i in range(len(self.host.disks))]
        disk_args = list(zip(self.host.disks, block_sizes, strict=True))
        self._set_deadline(stream, job_deadline(self.host, started, 0))  # until the hello says how much to read
        stream.write(
            protocol.encode_request(
                disk_args, self.host.pre_hook, self.host.post_hook,
                consistency=self.host.consistency, freeze_limit=self.host.freeze_limit, pause_frozen=pause("frozen"),
                resident=self.pool is not None, track_from=track_from,
            )
        )  # fmt: skip
        records = protocol.RecordReader(stream.recv_some)
        hello = self._expect_hello(records, stream)
        self.hello_seen = True
        if hello.tracked and track_from is None:
            raise violation(self.host, "a point of written blocks only, which the appliance did not ask for")
        self._say_how_it_reads(hello, track_from)
        self.progress.total = sum(d.size for d in hello.disks)
        self._set_deadline(stream, job_deadline(self.host, started, self.progress.total))
        previous = self.chain.newest
        plans = [self._plan_disk(i, remote.size, block_sizes[i], previous) for i, remote in enumerate(hello.disks)]
        sender = None
        if not hello.tracked:
            sender = threading.Thread(target=self._send_old_hashes, args=(stream, plans), daemon=True)
            sender.start()
        with ExitStack() as stack:
            receivers = [
                stack.enter_context(DiskReceiver(self, plan, remote.path))
                for plan, remote in zip(plans, hello.disks, strict=True)
            ]
            for rx in receivers:
                if hello.tracked:
                    records.add_disk(rx.plan.size, rx.plan.block_size)
                else:
                    records.start_disk(rx.plan.size, rx.plan.block_size)
                    self._first_pass(records, stream, rx)
            self.moment = self._later_passes(records, stream, receivers)
            finished = self._next(records, stream)
            if not isinstance(finished, Finished):
                raise violation(self.host, f"a {_kind(finished)} record after the moment record")
            for rx in receivers:
                rx.flush()
        checkpoint("capture.export_closed")
        hook = finished.post_hook
        if hook and hook.get("rc") != 0:
            log.warning("backup.post_hook_failed", host=self.host.name, rc=hook.get("rc"), output=hook.get("output"))
        if sender is not None:
            self._join_sender(sender, stream)
        if self.pool is None:
            stream.wait(timeout=self._time_left(30))
        return [rx.finish(self.moment.reread[i]) for i, rx in enumerate(receivers)]

    def _say_how_it_reads(self, hello: Hello, track_from: str | None) -> None:
        if hello.tracked:
            log.info("backup.tracked", host=self.host.name, reads="only the blocks written since the last point")
        elif self.pool is not None:
            reason = "the reader found a doubt (see its host's log)" if track_from else "no reader kept for this point"
            log.info("backup.full_read", host=self.host.name, reason=hello.untracked or reason)

    def _join_sender(self, sender: threading.Thread, stream: RemoteStream) -> None:
        sender.join(timeout=self._time_left(30))
        failure = self._sender_failure(stream)
        if failure is not None:
            raise failure
        if sender.is_alive():  # the reader reads every hash before it ends its last disk
            raise violation(self.host, "the end of the run before it read the hashes the appliance sent")

    def _set_deadline(self, stream: RemoteStream, deadline: float) -> None:
        self.deadline = deadline
        stream.set_deadline(deadline)

    def _time_left(self, at_most: float) -> float:
        return max(0.0, min(at_most, self.deadline - time.monotonic()))

    def _expect_hello(self, records: protocol.RecordReader, stream: RemoteStream) -> Hello:
        first = self._next(records, stream, starting=True)
        if not isinstance(first, Hello):
            raise violation(self.host, f"a {_kind(first)} record before the hello")
        paths = tuple(d.path for d in first.disks)
        if paths != self.host.disks:
            named = ", ".join(repr(protocol.printable(p, 100)) for p in paths[:4])
            raise violation(
                self.host,
                f"a hello naming {len(paths)} disks ({named}) instead of the {len(self.host.disks)} asked for",
            )
        for disk in first.disks:
            if disk.size < 0:
                raise violation(self.host, f"a hello with a size of {disk.size} bytes for {disk.path}")
            if disk.size > self.host.max_disk_size:
                raise ProtocolViolationError(
                    f"{self.host.name}: {disk.path} is {format_size(disk.size)} on the host, more than its limit of "
                    f"{format_size(self.host.max_disk_size)}; nothing was recorded",
                    hint=f"if it really is that large: `appliance host set {self.host.name} --max-disk-size SIZE`",
                )
        log.info(
            "backup.connected",
            host=self.host.name,
            python=first.python,
            disks=[{"path": d.path, "size": d.size, "kind": d.kind} for d in first.disks],
        )
        return first

    def _next(self, records: protocol.RecordReader, stream: RemoteStream, starting: bool = False) -> protocol.Record:
        """The next record, with every way the host side can fail turned into one clear error."""
        try:
            record = records.next()
        except EOFError:
            raise self._sender_failure(stream) or ended_early(self.host, stream, starting) from None
        except protocol.ProtocolError as exc:
            raise violation(self.host, f"{exc}{' before the hello' if starting else ''}") from exc
        except ConnectionLostError as exc:  # the sender's failure, when it caused this, is the one to name
            raise self._sender_failure(stream) or self._named(exc, stream) from exc
        if isinstance(record, RemoteFailure):
            raise self._failure(record)
        return record

    def _failure(self, failure: RemoteFailure) -> Exception:
        """What the other side's fatal error (its X record) means here."""
        return _remote_failure(self.host.name, failure)

    def _named(self, exc: ConnectionLostError, stream: RemoteStream) -> ConnectionLostError:
        return self._past_deadline(stream) if isinstance(exc, JobDeadlineError) else exc

    def _past_deadline(self, stream: RemoteStream) -> JobDeadlineError:
        p = self.progress
        elapsed = max(time.monotonic() - self.started, 1e-3)
        return JobDeadlineError(
            f"{self.host.name}: the backup passed its deadline of {self.deadline - self.started:.0f} s (for "
            f"{format_size(p.total)} at the host's minimum rate of {format_size(self.host.min_rate)}/s), receiving "
            f"{format_size(stream.bytes_received / elapsed)}/s, {format_size(p.read)} read on the host"
        )

    def _sender_failure(self, stream: RemoteStream) -> BaseException | None:
        """What stopped the thread that sends the previous hashes, as the error to show; None if it did not fail."""
        exc = self._sender_error
        if exc is None or isinstance(exc, ApplianceError):
            return self._named(exc, stream) if isinstance(exc, ConnectionLostError) else exc
        if isinstance(exc, OSError | protocol.ProtocolError):
            return ChainCorruptError(
                f"{self.host.name}: the previous point's block hash list cannot be read: "
                f"{getattr(exc, 'strerror', None) or exc}; nothing was recorded",
                hint=f"run `appliance verify {self.host.name} --repair` to rebuild it from the point",
            )
        return exc  # a bug: shown as an internal error

    # -- per disk -------------------------------------------------------------------------------------

    def _block_size(self, slot: str) -> int:
        """A chain keeps the block size it started with; a new disk takes the host's setting."""
        previous = self.chain.newest
        if previous is not None and any(d.slot == slot for d in previous.disks):
            return previous.disk(slot).block_size
        return self.host.block_size

    def _plan_disk(
        self, index: int, size: int, block_size: int, previous: Point | None, *, create: bool = True
    ) -> _DiskPlan:
        """`create`: a new overlay on the previous point (False: a kept partial point's, to go on with)."""
        slot = slot_name(index)
        prev_disk = None
        prev_hashes = None
        if previous is not None and any(d.slot == slot for d in previous.disks):
            prev_disk = previous.disk(slot)
            prev_hashes = self.tx.hash_list(previous.id, slot)
            if not prev_hashes.exists():
                raise ChainCorruptError(
                    f"{self.host.name}: the block hash list of point {previous.id} ({slot}) is missing",
                    hint=f"run `appliance verify {self.host.name} --repair` to rebuild it from the point",
                )
        files = self.draft.disk(slot)
        carry = carry_over(prev_disk.size if prev_disk else None, size, block_size)
        backing = Path(prev_disk.file).name if prev_disk else None
        if create:  # clusters no larger than a block (see DEFAULT_BLOCK_SIZE)
            self.tools.images.create(files.image, size, backing, cluster_size=min(block_size, 65536))
            checkpoint("capture.created")
        return _DiskPlan(slot, files.relative, files.image, files.hashes, size, block_size, carry, prev_disk,
                         prev_hashes)  # fmt: skip

    def _send_old_hashes(self, stream: RemoteStream, plans: list[_DiskPlan], at: tuple[int, int] = (0, 0)) -> None:
        """Runs in a thread of its own. On failure it keeps its error for the main thread and aborts the stream,
        so the main thread stops at once (rather than wait for records that need these hashes) and names it.
        `at`: (disk, block) to start from (a resumed replication)."""
        try:
            for index, plan in enumerate(plans):
                if index < at[0]:
                    continue
                start = at[1] if index == at[0] else 0
                previous: Iterator[bytes] = iter_chunks(plan.prev_hashes) if plan.prev_hashes else iter(())
                old_size = plan.prev.size if plan.prev else 0
                pending = bytearray()
                for piece in protocol.encode_old_hashes(previous, plan.carry, old_size, plan.block_size, start):
                    pending += piece
                    if len(pending) >= 1 << 20:
                        stream.write(bytes(pending))
                        pending.clear()
                if pending:
                    stream.write(bytes(pending))
        except BaseException as exc:
            self._sender_error = exc
            stream.abort()

    def _first_pass(self, records: protocol.RecordReader, stream: RemoteStream, rx: DiskReceiver) -> None:
        """The disk read in full, compared with the previous point: up to its E record, proven by its digest."""
        done_before = self.progress.read
        while True:
            record = self._next(records, stream)
            if isinstance(record, DataRun | ZeroRun):
                rx.write(record)
                self._written(rx, record)
            elif isinstance(record, Progress):
                self._report(done_before + record.read, stream)
            elif isinstance(record, DiskEnd):
                break
            else:
                raise violation(self.host, f"a {_kind(record)} record in the middle of {rx.plan.slot}")
        rx.check.drain()  # data that is not what its hash says is the host's lie, not a digest mismatch
        digest = rx.hashes.digest()
        if digest != record.digest:
            raise ChainCorruptError(
                f"{self.host.name} {rx.plan.slot}: the received blocks do not add up to the digest the host computed "
                f"({digest[:12]} != {record.digest[:12]}); the point was not recorded"
            )
        rx.first_read = record.read
        self._report(done_before + record.read, stream)

    def _written(self, rx: DiskReceiver, record: DataRun | ZeroRun) -> None:
        """A record of the first pass is written: nothing to do here (a replication keeps track of it)."""

    def _later_passes(
        self, records: protocol.RecordReader, stream: RemoteStream, receivers: list[DiskReceiver]
    ) -> Moment:
        """Blocks written on the host while it read them, read again, up to the moment record."""
        rx: DiskReceiver | None = None
        while True:
            record = self._next(records, stream)
            if isinstance(record, Repass):
                if rx is None:  # the freeze and the passes before it get their own budget of time
                    self._set_deadline(stream, job_deadline(self.host, time.monotonic(), 2 * self.progress.total)
                                       + self.host.freeze_limit * wire.FREEZE_TRIES)  # fmt: skip
                rx = receivers[record.disk]
            elif isinstance(record, DataRun | ZeroRun) and rx is not None:
                rx.write(record)
            elif isinstance(record, Moment):
                return record
            else:
                raise violation(self.host, f"a {_kind(record)} record before the moment record")

    def _report(self, read: int, stream: RemoteStream) -> None:
        self.progress.read = read
        self.progress.received = stream.bytes_received
        self.progress_fn(self.progress)


@dataclass(frozen=True, slots=True)
class _DiskPlan:
    slot: str
    relative: str
    image: Path
    hash_path: Path
    size: int
    block_size: int
    carry: Carry
    prev: DiskPoint | None
    prev_hashes: Path | None


class DiskReceiver:
    """One disk of the point being received: its new overlay (exported for writing), its hash list and the
    check of every block against its hash, open from its first pass to the last."""

    def __init__(self, capture: Capture, plan: _DiskPlan, source: str, *, resume: bool = False) -> None:
        """`resume`: the overlay and hash list are a kept partial point's, gone on with as they are."""
        self.capture = capture
        self.plan = plan
        self.source = source
        self.resume = resume
        self.first_read = 0
        self.changed = self.sent = 0
        self._stack = ExitStack()

    def __enter__(self) -> DiskReceiver:
        plan = self.plan
        self.hashes = HashListWriter(plan.hash_path, plan.prev_hashes, plan.carry, plan.size, plan.block_size,
                                     resume=self.resume)  # fmt: skip
        self.check = _HashCheck(self.capture.host)
        try:
            self.exported = self._stack.enter_context(
                self.capture.tools.images.export(plan.image, self.capture.tx.run_dir, writable=True)
            )
            self.sink = OverlaySink(self.exported, self.hashes)
        except BaseException:
            self.__exit__(True)
            raise
        return self

    def __exit__(self, failed: object, *rest: object) -> None:
        """The export closes either way; the hash list stays only for `finish`, after a run that went well."""
        try:
            self._stack.close()
        finally:
            self.check.close()
            if failed:
                self.hashes.discard()

    def write(self, record: DataRun | ZeroRun) -> None:
        plan = self.plan
        if isinstance(record, DataRun):
            checkpoint("capture.data")
            self.check.submit(record, plan.block_size)
            self.sink.put_data(record.first * plan.block_size, record.data, record.first, record.hashes)
            self.changed += len(record.data)
            self.sent += len(record.data)
        else:
            offset = record.first * plan.block_size
            length = min(record.count * plan.block_size, plan.size - offset)
            self.sink.put_zeroes(offset, length, record.first, record.count)
            self.changed += length

    def flush(self) -> None:
        """Every block checked and on the appliance's disk."""
        self.check.drain()
        self.exported.flush()
        checkpoint("capture.written")

    def sync(self) -> None:
        """Every block received so far checked and on the appliance's disk, with its hash (a partial point
        may then be kept up to here)."""
        self.flush()
        self.hashes.sync()

    def finish(self, reread: int) -> DiskPoint:
        """The disk as recorded, its hash list complete (called once its export is closed)."""
        plan = self.plan
        digest = self.hashes.finish()
        return DiskPoint(
            slot=plan.slot, source=self.source, file=plan.relative, size=plan.size, block_size=plan.block_size,
            digest=digest, read_bytes=self.first_read + reread, changed_bytes=self.changed, sent_bytes=self.sent,
        )  # fmt: skip


def _kind(record: protocol.Record) -> str:
    """A record's name as the wire format's doc calls it."""
    return {
        "DataRun": "data",
        "ZeroRun": "zero",
        "DiskEnd": "end-of-disk",
        "RemoteFailure": "failure",
        "Repass": "later-pass",
    }.get(type(record).__name__, type(record).__name__.lower())


def _remote_failure(host: str, failure: RemoteFailure) -> ApplianceError:
    if failure.code.startswith("disk-") or failure.code == "read-error":
        hint = f"check the disk paths with `appliance host show {host}` and on the host itself"
        return DiskAccessError(f"{host}: {failure.message}", hint=hint)
    if failure.code == "snapshot-overflow":
        hint = "give the volume group more free extents (vgextend), or move the volume to a thin pool"
        return RemoteCommandError(f"{host}: {failure.message}; nothing was recorded", hint=hint)
    return RemoteCommandError(f"{host}: {failure.message}")


class Import(Capture):
    """A point from local images instead of a host: same plan, same writes, same publication."""

    def __init__(
        self, tx: ChainTx, tools: Tools, host: Host, sources: list[tuple[str, Path, int]], origin: str,
        *, point: tuple[str, datetime] | None = None,
    ) -> None:  # fmt: skip
        """`point`: the id and time the point already has elsewhere (a seed from another site keeps them)."""
        super().__init__(tx, tools, host, point=point)
        self.sources = sources
        self.origin = origin

    def run(self, started: float) -> Point:
        previous = self.chain.newest
        disks = []
        for index, (source, image, size) in enumerate(self.sources):
            plan = self._plan_disk(index, size, self._block_size(slot_name(index)), previous)
            disks.append(self._import_disk(plan, source, image))
        return Point(
            id=self.draft.id, created=self.created, seconds=time.monotonic() - started, disks=tuple(disks),
            extra={"origin": self.origin},
        )  # fmt: skip

    def _import_disk(self, plan: _DiskPlan, source: str, image: Path) -> DiskPoint:
        hashes = HashListWriter(plan.hash_path, plan.prev_hashes, plan.carry, plan.size, plan.block_size)
        held = PreviousHashes(plan.prev_hashes, plan.carry, plan.size, plan.block_size)
        run_dir = self.tx.run_dir
        try:
            with self.tools.images.export(plan.image, run_dir, writable=True) as exported:
                chunks = read_chunks(self.tools, image, run_dir, plan.size, plan.block_size)
                copied = copy_changes(chunks, held, OverlaySink(exported, hashes), plan.size, plan.block_size)
                exported.flush()
            digest = hashes.finish()
        except BaseException:
            hashes.discard()
            raise
        finally:
            held.close()
        return DiskPoint(slot=plan.slot, source=source, file=plan.relative, size=plan.size, block_size=plan.block_size,
                         digest=digest, read_bytes=plan.size, changed_bytes=copied.changed)  # fmt: skip
