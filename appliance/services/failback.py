# SPDX-License-Identifier: GPL-2.0-or-later
"""Failback: the recovery VM's disks back onto the repaired server, with little downtime.

  1. Bulk copy while the VM runs. QEMU makes a point-in-time copy of every disk (libvirt push backup)
     and starts a checkpoint, a persistent dirty bitmap. The target (booted into a rescue system)
     hashes what its disks hold; only blocks that differ cross the wire.
  2. Passes over what changed since: each is an incremental backup since the last checkpoint (only
     the clusters the guest wrote), sent as it is. No re-reading of the disk: QEMU's bitmaps say what
     changed. Passes repeat until what is left is small (or, with `--cutover manual`, until asked).
  3. Cutover: the guest is shut down (ACPI, forced after a timeout). Its dirty bitmaps are then in its
     overlays: qemu-storage-daemon copies what they mark since the last pass that was sent, and that
     is sent. A pass whose changes are small is not sent but left to the cutover, so blocks the guest
     keeps rewriting cross the wire as few times as possible.
  4. The proof: every block of every target disk, as the target reads it back from its disk, against
     the VM's disk (see store/ledger.py: the target reads back only what it was sent since it last
     hashed its disk, the VM's side is known from the reads that fed the copy). Downtime runs from the
     shutdown to this proof. `full_proof` instead reads both whole disks again: the same answer, a
     downtime that grows with the disk's size.
  5. The VM's final state becomes a new recovery point of the host, so the writes made during the
     failover are backed up too. That reads the whole VM disk: its block hashes must match the ledger
     of what was sent, an independent check of QEMU's dirty tracking. Only then are the VM and its
     overlays removed.
A failback that stops anywhere leaves the VM (or its kept overlays) as they were; the next run starts
again from step 1, which sends only what the target does not hold yet. Success is only ever declared
on matching digests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from appliance.agent import wire, writer_source
from appliance.domain.blocks import HASH_LEN, DiskDigest
from appliance.domain.models import DiskPoint, Host, HostKey, Point, parse_address, slot_name
from appliance.domain.recovery import RecoveryVm, target_dev
from appliance.errors import (
    ApplianceError,
    ConfigError,
    ConnectionLostError,
    FailoverError,
    HostKeyError,
    RemoteCommandError,
    RemoteError,
)
from appliance.faults import checkpoint, fault
from appliance.log import get_logger
from appliance.ports import RemoteStream, Tools
from appliance.services.backup import import_point
from appliance.services.failover import stop_block_servers
from appliance.services.hosts import ConfirmKey, pin_host_key
from appliance.services.image_reader import Chunk, read_chunks
from appliance.services.pipeline import copy_changes
from appliance.services.reader_session import how_it_ended, start_agent
from appliance.store import chains, hosts, recovery
from appliance.store import failback as records
from appliance.store.chains import ChainTx
from appliance.store.layout import Home
from appliance.store.ledger import ENTRY, Ledger, differing_blocks, entries, prefixes
from appliance.transfer.protocol import ProtocolError
from appliance.transfer.target import TargetError, TargetSession

log = get_logger(__name__)

Say = Callable[[str], None]
SMALL_ENOUGH = 32 << 20  # dirty bytes at which a pass is followed by the cutover
MAX_PASSES = 10


@dataclass(slots=True)
class Progress:
    """What `failback status` shows (written to failback/<host>.json as it goes)."""

    host: str
    target: str
    phase: str = "starting"
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    passes: int = 0
    bytes_sent: int = 0
    dirty_bytes: int = 0
    rate: float = 0.0  # bytes per second of the last pass
    downtime_seconds: float | None = None
    total_seconds: float | None = None
    point: str = ""
    error: str = ""

    @property
    def estimated_downtime(self) -> float:
        return self.dirty_bytes / self.rate + 5.0 if self.rate else 0.0


def status(home: Home, name: str) -> Progress | None:
    return records.load_progress(home, name, Progress)


def request_cutover(home: Home, name: str) -> None:
    """`failback HOST --cutover now`: the running failback cuts over after its current pass."""
    if status(home, name) is None:
        raise FailoverError(f"no failback of {name} is under way", hint="start one with `appliance failback`")
    records.request_cutover(home, name)


@dataclass(frozen=True, slots=True)
class Target:
    host: Host  # the repaired server as an SSH endpoint (reusing the protected host's key)
    disks: tuple[str, ...]  # target path per VM disk, in the VM's disk order


@dataclass(frozen=True, slots=True)
class _Options:
    """How the user asked the failback to run."""

    cutover: str
    shutdown_timeout: float
    full_proof: bool
    force: bool


def fail_back(
    home: Home, tools: Tools, name: str, *, to: str, mapping: Sequence[str], key: Path | None = None,
    fingerprint: str | None = None, trust_first_use: bool = False, confirm: ConfirmKey | None = None,
    cutover: str = "auto", shutdown_timeout: float = 120.0, full_proof: bool = False, force: bool = False,
    say: Say = lambda _: None,
) -> Progress:  # fmt: skip
    """Copy the recovery VM of `name` to the target, cut over, prove it, keep the final state as a point.

    `force` writes to a target disk that is mounted or in use on the target (refused otherwise).

    :raises FailoverError: no recovery VM, a bad mapping, a target disk too small or in use.
    :raises HostKeyError: the target's key is not the one pinned for its address, or nobody vouched for it.
    :raises RemoteError: the target is unreachable, failed or spoke garbage (25), the link broke (24); run
        again to resume.
    """
    started = time.monotonic()
    host = hosts.load(home, name)
    # The host's lock for the whole failback: no backup, verification or merge of this host meanwhile
    # (their leftover removal would unmount this job's exports), and the final point is added under it.
    with chains.open(home, tools.images, name, "failback", wait=30.0) as tx:
        vm = recovery.load(home, name)
        if vm is None:
            raise FailoverError(f"{name} has no recovery VM to fail back",
                                hint="`appliance failover status` lists them")  # fmt: skip
        point = _vm_point(tx, tools, host, vm)
        target = _target(home, tools, host, point, to, mapping, key, fingerprint, trust_first_use, confirm)
        progress = Progress(name, f"{target.host.target} {' '.join(target.disks)}")
        records.clear_cutover(home, name)
        try:
            options = _Options(cutover, shutdown_timeout, full_proof, force)
            return _run(tx, tools, host, vm, point, target, progress, options, started, say)
        finally:
            records.remove_work(home, name)


def _vm_point(tx: ChainTx, tools: Tools, host: Host, vm: RecoveryVm) -> Point:
    """The point the VM was booted from: in the chain, or (a VM booted from a cloud store) as its overlays
    and the host's record describe it: what failback needs of it is each disk's path, size and block size."""
    cloud = recovery.cloud_source(tx.home, host.name)
    if cloud is None:
        return tx.chain.find(vm.point)
    sizes = [int(n) for n in cloud.get("sizes", "").split()]
    if len(sizes) != len(vm.overlays) or len(host.disks) != len(vm.overlays):
        raise FailoverError(f"{host.name}'s recovery VM from cloud store {cloud.get('store')} does not list its disks")
    disks = tuple(
        DiskPoint(slot=slot_name(i), source=source, file="", size=size, block_size=host.block_size, digest="")
        for i, (source, size) in enumerate(zip(host.disks, sizes, strict=True))
    )  # fmt: skip
    return Point(id=vm.point, created=vm.started, seconds=0.0, disks=disks)


def _run(tx: ChainTx, tools: Tools, host: Host, vm: RecoveryVm, point: Point, target: Target, progress: Progress,
         options: _Options, started: float, say: Say) -> Progress:  # fmt: skip
    home, name = tx.home, host.name
    work = records.work_dir(home, name)
    try:
        with tools.remote.connect(target.host) as session:
            stream = start_agent(session, target.host.python, writer_source(), wire.WRITER_BOOTSTRAP)
            writer = TargetSession(stream)
            try:
                copier = _copy_and_prove(tx, tools, vm, point, target, writer, progress, options, work, say)
            except (TargetError, ProtocolError, EOFError) as exc:
                raise _target_failed(exc, stream, target.host, writer.opened) from exc
        progress.phase = "recording the final state as a recovery point"
        _save(home, progress)
        new_point = import_point(
            tx, tools, host, [(d.source, Path(o), d.size) for d, o in zip(point.disks, vm.overlays, strict=True)],
            origin=f"failback of {vm.name} to {target.host.target}",
        )  # fmt: skip
        copier.cross_check(new_point)
        tools.hypervisor.remove(vm.name)
        stop_block_servers(tools, home.failover_dir(name))  # a VM booted from a cloud store: its NBD servers
        recovery.remove(home, name)
        progress.point = new_point.id
        progress.phase = "done"
        progress.total_seconds = round(time.monotonic() - started, 2)
        _save(home, progress)
        log.info("failback.done", host=name, target=progress.target, downtime=progress.downtime_seconds,
                 total=progress.total_seconds, sent=progress.bytes_sent, point=new_point.id)  # fmt: skip
        return progress
    except ApplianceError as exc:
        progress.phase, progress.error = "failed (run failback again to resume)", exc.message
        _save(home, progress)
        raise


def _copy_and_prove(tx: ChainTx, tools: Tools, vm: RecoveryVm, point: Point, target: Target, writer: TargetSession,
                    progress: Progress, options: _Options, work: Path, say: Say) -> _Copier:  # fmt: skip
    """Every block onto the target, proven; the VM is down afterwards. Returns the copier for its ledgers."""
    _open_target(writer, target, point, options.force, say)
    copier = _Copier(tx, tools, vm, point, writer, progress, work, say)
    if tools.hypervisor.exists(vm.name) and tools.hypervisor.state(vm.name).state == "paused":
        tools.hypervisor.destroy_keep(vm.name)  # left paused by an interrupted cutover: the guest is down
    if tools.hypervisor.exists(vm.name) and tools.hypervisor.state(vm.name).running:
        copier.live(options.cutover, options.shutdown_timeout)
    else:
        copier.offline()
    copier.prove_full() if options.full_proof else copier.prove()
    writer.close()
    return copier


def _target_failed(exc: Exception, stream: RemoteStream, target: Host, opened: bool) -> RemoteError:
    """What a failure of the target's side means, in one line: the writer failed or spoke garbage (25), or
    the link broke (24). Either way the VM is as it was and a new run resumes."""
    where = target.target
    if isinstance(exc, TargetError):
        return RemoteCommandError(f"the writer on {where} failed: {exc} ({exc.code})", hint=_RESUME)
    if isinstance(exc, ProtocolError):
        return RemoteCommandError(f"{where} does not speak the failback writer's protocol: {exc}", hint=_RESUME)
    status, last = how_it_ended(stream, limit=300)
    if status < 0:
        return ConnectionLostError(f"the connection to {where} broke during the failback", hint=_RESUME)
    if status == 127 or (not opened and "not found" in last):
        return RemoteCommandError(f"{target.python} was not found on {where}",
                                  hint="the target needs python3 (standard library only)")  # fmt: skip
    return RemoteCommandError(f"the writer on {where} stopped (exit {status}){': ' + last if last else ''}",
                              hint=_RESUME)  # fmt: skip


_RESUME = "nothing was removed; run failback again to resume"


def _save(home: Home, progress: Progress) -> None:
    records.save_progress(home, progress.host, asdict(progress))


def _target(home: Home, tools: Tools, host: Host, point: Point, to: str, mapping: Sequence[str], key: Path | None,
            fingerprint: str | None, trust: bool, confirm: ConfirmKey | None) -> Target:  # fmt: skip
    user, address, port = parse_address(to, None)
    if key is None and host.replica_of:
        raise ConfigError(
            f"{host.name} is a replica of site {host.replica_of}: the key this appliance has is for that site, "
            "not for the repaired server",
            hint="give the key that logs in to the repaired server with --key",
        )
    by_source = {d.source: i for i, d in enumerate(point.disks)}
    paths: dict[int, str] = {}
    for item in mapping:
        vm_disk, sep, target_disk = item.partition("=")
        if not sep or not target_disk.startswith("/"):
            raise ConfigError(f"invalid --disk {item!r}: use VM_DISK=TARGET_DISK, e.g. /dev/sda=/dev/sda")
        if vm_disk not in by_source:
            known = ", ".join(by_source)
            raise ConfigError(f"the recovery VM has no disk {vm_disk!r}; its disks: {known}")
        paths[by_source[vm_disk]] = target_disk
    if len(paths) != len(point.disks):
        missing = [d.source for i, d in enumerate(point.disks) if i not in paths]
        raise ConfigError(f"map every disk of the VM to a target disk; missing: {', '.join(missing)}")
    pinned = _target_key(home, tools, host.name, address, port, fingerprint, trust, confirm)
    key_file = host.key_file if key is None else hosts.install_key(home, host.name, key, failback=True)
    target_host = replace(host, address=address, port=port, user=user, host_key=pinned, key_file=key_file)
    return Target(target_host, tuple(paths[i] for i in range(len(point.disks))))


def _target_key(home: Home, tools: Tools, name: str, address: str, port: int, fingerprint: str | None, trust: bool,
                confirm: ConfirmKey | None) -> HostKey:  # fmt: skip
    """The target's key: the one pinned for this address and port, which a run never replaces on its own
    (`--trust-first-use` pins only when nothing is pinned); a given fingerprint that the target's key
    matches pins it anew (the way to accept a reinstalled target).

    :raises HostKeyError: the target presents another key than the one pinned, or nobody vouched for it.
    """
    pinned = _pinned_target_key(home, name, address, port)
    if pinned is not None and not fingerprint:
        seen = tools.remote.scan_host_key(address, port)
        if seen.fingerprint != pinned.fingerprint:
            raise HostKeyError(
                f"HOST KEY CHANGED for failback target {address}:{port}: pinned {pinned.fingerprint}, target "
                f"presented {seen.fingerprint} ({seen.key_type}); refusing to connect",
                hint="--trust-first-use pins only a target with no key pinned; if the target was reinstalled, check "
                f"its new key out of band and pass `--host-key-fingerprint {seen.fingerprint}`",
            )
        return pinned
    key = pin_host_key(tools, address, port, fingerprint=fingerprint, trust_first_use=trust and pinned is None,
                       confirm=confirm)  # fmt: skip
    if pinned is not None and key.fingerprint != pinned.fingerprint:
        log.warning("failback.target_key_repinned", host=name, address=address, port=port, old=pinned.fingerprint,
                    new=key.fingerprint)  # fmt: skip
    records.save_target_key(home, name, address, port, key)
    return key


def _pinned_target_key(home: Home, name: str, address: str, port: int) -> HostKey | None:
    """A key pinned by an earlier run of this failback (for resuming without asking again)."""
    pinned = records.load_target_key(home, name)
    if pinned is None or pinned[:2] != (address, port):
        return None
    return pinned[2]


def _open_target(writer: TargetSession, target: Target, point: Point, force: bool, say: Say) -> None:
    """The writer opens every target disk, or refuses (too small, mounted or in use) before anything is
    written; with `force`, a disk in use is written anyway, and that is said and logged."""
    where = target.host.target
    disks = [(path, d.size, d.block_size) for path, d in zip(target.disks, point.disks, strict=True)]
    infos = writer.open(disks, force=force)
    for info in infos:
        if force and info.get("busy"):
            say(f"--force: writing to {info['path']} on {where} although it is {info['busy']}")
            log.warning("failback.forced", target=where, disk=info["path"], busy=info["busy"])
    for info in infos:
        if "error" in info:
            hint = "unmount it on the target (or stop what holds it), or pass --force" if info.get("busy") else None
            raise FailoverError(f"target {where}: {info['error']}; nothing was written", hint=hint)


class _Copier:
    def __init__(self, tx: ChainTx, tools: Tools, vm: RecoveryVm, point: Point, writer: TargetSession,
                 progress: Progress, work: Path, say: Say) -> None:  # fmt: skip
        self.tx, self.home, self.tools, self.vm, self.point = tx, tx.home, tools, vm, point
        self.writer, self.progress, self.work, self.say = writer, progress, work, say
        self.run_dir = tx.run_dir
        self.checkpoints: list[str] = []  # in the order they were made
        self.downtime_started = 0.0
        disks = point.disks
        self.vm_ledgers = [Ledger(work / f"vm-{i}.ledger", d.size, d.block_size) for i, d in enumerate(disks)]
        self.target_ledgers = [Ledger(work / f"target-{i}.ledger", d.size, d.block_size) for i, d in enumerate(disks)]

    def _update(self, phase: str) -> None:
        self.progress.phase = phase
        _save(self.home, self.progress)
        log.info("failback.progress", host=self.vm.host, phase=phase, sent=self.progress.bytes_sent,
                 dirty=self.progress.dirty_bytes)  # fmt: skip

    # -- the copy -------------------------------------------------------------------------------------

    def live(self, cutover: str, shutdown_timeout: float) -> None:
        hv = self.tools.hypervisor
        hv.drop_checkpoints(self.vm.name)  # from an earlier, interrupted failback: start afresh
        self._update("bulk copy while the VM runs")
        self.say("bulk copy: QEMU copies the disks at this instant; the target sends what it holds")
        for index, image in enumerate(self._backup(since=None)):
            self._send_differences(index, image)
            image.unlink()
        self._flush_and_read_back()
        checkpoint("failback.bulk_sent")
        sent = 0  # index in self.checkpoints of the last one whose changes have all been sent
        while True:
            self.progress.passes += 1
            files = self._backup(since=self.checkpoints[sent])
            dirty = sum(length for f in files for _, length, _ in self.tools.images.own_extents(f))
            self.progress.dirty_bytes = dirty
            small = dirty <= SMALL_ENOUGH or self.progress.passes >= MAX_PASSES
            ready = records.cutover_requested(self.home, self.vm.host) if cutover == "manual" else small
            if ready:  # left for the cutover, which sends everything since the last sent checkpoint once
                for f in files:
                    f.unlink()
                break
            self._update(f"pass {self.progress.passes}: blocks written since the last pass")
            self.say(f"pass {self.progress.passes}: {dirty >> 20} MiB written by the guest since the last pass")
            self._send_extents(files)
            # only the newest checkpoint matters now; the older ones would pile up over a long wait
            self.tools.hypervisor.drop_checkpoints(self.vm.name, only=self.checkpoints[:-1])
            self.checkpoints = self.checkpoints[-1:]
            sent = 0
            if cutover == "manual" and small:
                self._update(f"waiting for `appliance failback {self.vm.host} --cutover now`")
                time.sleep(5.0)
        self._update("cutover: shutting the guest down")
        self.say(f"cutover: shutting the guest down, {self.progress.dirty_bytes >> 20} MiB left (the downtime starts)")
        self.downtime_started = time.monotonic()
        hv.shutdown(self.vm.name)
        deadline = time.monotonic() + shutdown_timeout
        while hv.state(self.vm.name).running and time.monotonic() < deadline:
            time.sleep(0.1)
        if hv.state(self.vm.name).running:
            self.say(f"the guest did not shut down within {shutdown_timeout:.0f} s; powering it off")
        hv.destroy_keep(self.vm.name)
        checkpoint("failback.guest_down")
        self._update("cutover: the last blocks")
        self._send_last(self.checkpoints[sent:])

    def _send_last(self, bitmaps: list[str]) -> None:
        """With QEMU stopped, the dirty bitmaps are in the overlays: copy what they mark and send it. If
        they cannot be used (QEMU was killed), compare the whole disks instead: slower, as correct."""
        files = [self.work / f"last-disk{i}.qcow2" for i in range(len(self.vm.overlays))]
        try:
            for overlay, target in zip(self.vm.overlays, files, strict=True):
                self.tools.images.copy_dirty(Path(overlay), bitmaps, target, self.run_dir)
        except ApplianceError as exc:
            log.warning("failback.bitmaps_unusable", host=self.vm.host, error=exc.message)
            self.say("the dirty bitmaps cannot be used; comparing the whole disks instead")
            for index, overlay in enumerate(self.vm.overlays):
                self._send_differences(index, Path(overlay))
            self._flush_and_read_back()
            return
        self._send_extents(files)

    def offline(self) -> None:
        """The VM is stopped (overlays kept): one pass over its disks, no dirty tracking needed."""
        self.downtime_started = time.monotonic()
        self._update("copying the stopped VM's disks")
        for index, overlay in enumerate(self.vm.overlays):
            self._send_differences(index, Path(overlay))
        self._flush_and_read_back()

    def _backup(self, since: str | None) -> list[Path]:
        """A QEMU point-in-time copy (full, or since the last checkpoint) into local files."""
        name = f"fb{int(time.time() * 1000)}"
        files = [self.work / f"{name}-disk{i}.qcow2" for i in range(len(self.vm.overlays))]
        devs = [target_dev(self.vm.settings.disk_bus, i) for i in range(len(files))]
        self.tools.hypervisor.backup(self.vm.name, list(zip(devs, files, strict=True)), name, since)
        self.checkpoints.append(name)
        return files

    def _send_differences(self, index: int, image: Path) -> None:
        """Compare the target's blocks with the image's and send the ones that differ.

        The target's hashes are all received (into a file) before any block is sent: both directions
        then never wait on each other, whatever the disk's size."""
        disk = self.point.disks[index]
        bs = disk.block_size
        theirs_ledger, mine_ledger = self.target_ledgers[index], self.vm_ledgers[index]
        theirs_ledger.fill(self.writer.hash_prefixes(index))
        chunks = read_chunks(self.tools, image, self.run_dir, disk.size, bs)

        def seen(chunk: Chunk) -> None:  # every block of the VM's disk, into its ledger, changed or not
            mine_ledger.set_entries(chunk.offset // bs, prefixes(chunk.hashes))

        sink = _TargetSink(self.writer, index)
        copied = copy_changes(chunks, _LedgerHeld(theirs_ledger), sink, disk.size, bs, seen=seen)
        self.progress.bytes_sent += copied.data
        mine_ledger.complete = True

    def _send_extents(self, files: list[Path]) -> None:
        """Send the clusters each file holds itself (what changed), and flush the target."""
        started, sent = time.monotonic(), 0
        for index, image in enumerate(files):
            size = self.point.disks[index].size
            extents = self.tools.images.own_extents(image)
            with self.tools.images.export(image, self.run_dir, writable=False, backing=False) as exported:
                for start, length, zero in extents:
                    length = min(length, size - start)
                    if length <= 0:
                        continue
                    if not zero and fault("failback.missed_write"):  # as if QEMU's bitmap missed it
                        continue
                    if zero:
                        self.writer.zeroes(index, start, length)
                        self.vm_ledgers[index].record_zeroes(start, length)
                        continue
                    for off in range(start, start + length, 4 << 20):
                        data = exported.read(off, min(4 << 20, start + length - off))
                        self.writer.write(index, off, data)
                        self.vm_ledgers[index].record_data(off, data)
                        sent += len(data)
            image.unlink()
        self._flush_and_read_back()
        self.progress.bytes_sent += sent
        elapsed = time.monotonic() - started
        if sent and elapsed > 0:
            self.progress.rate = sent / elapsed

    # -- the proof ------------------------------------------------------------------------------------

    def _flush_and_read_back(self) -> None:
        """Make the target durable, and learn what its disks now hold where they were written."""
        self.writer.flush()
        for index, ledger in enumerate(self.target_ledgers):
            for first, theirs in self.writer.read_back(index):
                ledger.set_entries(first, theirs)

    def prove(self) -> None:
        """Every block of every target disk, as the target read it back, against the VM's disk."""
        self._update("verifying the target against the VM's disks")
        for index, (mine, theirs) in enumerate(zip(self.vm_ledgers, self.target_ledgers, strict=True)):
            if not (mine.complete and theirs.complete):
                raise FailoverError(f"disk {index} was not compared whole; nothing was removed, run failback again")
            if mine.unknown:  # blocks the last copies covered in part: read them from the stopped VM's disk
                self._fill_unknown(index, mine)
            count, first = differing_blocks(entries(mine.path), entries(theirs.path))
            if count:
                offsets = ", ".join(str(b * mine.block_size) for b in first)
                raise FailoverError(
                    f"target disk {index} differs from the VM's disk in {count} blocks (at bytes {offsets}); "
                    "nothing was removed, run failback again"
                )
        self._proven()

    def _fill_unknown(self, index: int, ledger: Ledger) -> None:
        bs = ledger.block_size
        with self.tools.images.export(Path(self.vm.overlays[index]), self.run_dir, writable=False) as exported:
            for block in sorted(ledger.unknown):
                length = min(bs, ledger.size - block * bs)
                ledger.record_data(block * bs, exported.read(block * bs, length))

    def prove_full(self) -> None:
        """Digests of both whole disks, both sides read at once: the same proof, without the ledgers."""
        self._update("verifying the target against the VM's disks (both read whole)")
        for index, overlay in enumerate(self.vm.overlays):
            disk = self.point.disks[index]
            self.writer.ask_digest(index)  # the target reads its disk while the appliance reads the VM's
            mine = DiskDigest()
            for chunk in read_chunks(self.tools, Path(overlay), self.run_dir, disk.size, disk.block_size):
                mine.add(chunk.hashes)
            theirs = self.writer.read_digest()
            if theirs != mine.hexdigest():
                raise FailoverError(
                    f"target disk {index} does not match the VM's disk after the copy ({theirs[:12]} != "
                    f"{mine.hexdigest()[:12]}); nothing was removed, run failback again"
                )
        self._proven()

    def _proven(self) -> None:
        self.progress.downtime_seconds = round(time.monotonic() - self.downtime_started, 2)
        self.say(f"verified: every target disk matches the VM's; downtime {self.progress.downtime_seconds:.1f} s")

    def cross_check(self, point: Point) -> None:
        """The new point was read from the whole VM disk: it must hold what the ledgers say was sent."""
        for index, disk in enumerate(point.disks):
            count, first = differing_blocks(
                entries(self.vm_ledgers[index].path), entries(self.tx.hash_list(point.id, disk.slot), HASH_LEN)
            )
            if count:
                raise FailoverError(
                    f"the VM's final disk {index} differs from what was sent in {count} blocks (first at byte "
                    f"{first[0] * disk.block_size}); the VM is kept: run failback again with --full-proof"
                )


class _LedgerHeld:
    """What the target holds, as its ledger says (HeldHashes)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def held(self, first: int, count: int) -> list[bytes | None]:
        raw = self.ledger.get_entries(first, count)
        return [raw[j * ENTRY : (j + 1) * ENTRY] for j in range(count)]


class _TargetSink:
    """A target disk through the failback writer (BlockSink)."""

    def __init__(self, writer: TargetSession, index: int) -> None:
        self.writer, self.index = writer, index

    def put_data(self, offset: int, data: bytes | memoryview, first: int, hashes: bytes) -> None:
        if fault("failback.bad_write"):  # as a failing disk or link on the target's side
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.writer.write(self.index, offset, data)

    def put_zeroes(self, offset: int, length: int, first: int, count: int) -> None:
        self.writer.zeroes(self.index, offset, length)
