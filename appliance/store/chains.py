# SPDX-License-Identifier: GPL-2.0-or-later
"""A host's chain as one transaction: `with chains.open(home, images, name, purpose) as tx:`.

Opening takes the host's lock, loads the catalog and puts the store in order (what an interrupted run
left behind is removed, never a listed point); the transaction then owns every durable change of the
chain, so no use case holds an fsync, a rename or a catalog write of its own:

  tx.new_point(id)        hidden `.part` files for a point being written (discarded unless published)
  tx.publish(new, point)  fsync every file, record the intent, rename into place, list the point last
  tx.merge(point)         consolidation's crash-safe merge of a point into its child
  tx.record(point)        a point's record replaced (a verification, a boot verdict)
  tx.keep_partial(new, at) a point being written kept for a later run to go on with (`Partial`): a
                          replication cut part-way resumes at its last confirmed block

Why a publication can be interrupted anywhere and leave the chain exactly as it was:
  1. everything of the new point is written under hidden `.part` names the catalog never lists;
  2. the files are fsynced, the intent (the names about to appear) is written, then each is renamed;
  3. only then is the catalog replaced (atomically) with one that lists the point.
A crash before 3 leaves files that no catalog lists and that the intent names: the next transaction
removes them. A crash after 3 leaves a complete point.

Why a merge can be interrupted anywhere (dropping point P, whose child is C, the next newer point):
  1. P is marked `dropping` in the catalog (it is then never offered again: its file is about to change);
  2. `qemu-img commit -d C`: C's clusters are written into P's file. At every moment C (and every point
     above it) reads exactly as before: P's file only gains clusters that C shadows anyway;
  3. fsync, then P's file is renamed over C's file name: atomic; the points above C find their backing
     file under the same name, now holding C's view merged with P's;
  4. P is removed from the catalog.
The next transaction finishes a merge that a crash interrupted (`finish_merges`): committing C twice
gives the same result, and a P whose file is gone was renamed already.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from appliance.domain.chain import Chain
from appliance.domain.models import DiskPoint, Point
from appliance.errors import ChainCorruptError, DamagedFileError
from appliance.faults import checkpoint
from appliance.log import get_logger
from appliance.ports import ImageTool
from appliance.store import catalog, cloud, recovery, sites
from appliance.store.files import fsync_dir, fsync_file, full_disk_as_store_full, read_as, write_atomic, write_json
from appliance.store.layout import Home, hashes_file, partial, point_file
from appliance.store.lock import HostLock

log = get_logger(__name__)

INTENT = "publishing.json"  # the files an unfinished publication renamed into place
PARTIAL = "partial.json"  # a point being written that a later run goes on with (`Partial`)


@dataclass(frozen=True, slots=True)
class _Intent:
    point: str
    files: tuple[str, ...]  # relative to the chain's folder


@dataclass(frozen=True, slots=True)
class Partial:
    """A point written up to a block and kept so that the next run goes on from there instead of from the
    start: every block before (`disk`, `block`) (whole disks before `disk`) is in its `.part` files and on
    the appliance's disk. It is valid only on the point it was written on (`base`, the chain's newest
    then, with `base_digests`): the next run checks that, and starts afresh otherwise."""

    point: str
    site: str
    base: str | None
    base_digests: dict[str, str]
    disk: int
    block: int


@dataclass(frozen=True, slots=True)
class DiskFiles:
    """Where one disk of a point being written lives until it is published."""

    slot: str
    relative: str  # the point file's name in the catalog, relative to the chain's folder
    image: Path  # the qcow2 file being written (hidden)
    hashes: Path  # its block hash list being written (hidden)


@dataclass(slots=True)
class NewPoint:
    """The files of a point that is not in the catalog yet."""

    id: str
    folder: Path
    disks: list[DiskFiles] = field(default_factory=list)
    published: bool = False
    kept: bool = False  # kept for a later run (a `Partial`): not discarded

    def disk(self, slot: str) -> DiskFiles:
        """The (hidden) files of one disk; its slot folder is created on first use."""
        relative = point_file(slot, self.id)
        (self.folder / slot).mkdir(exist_ok=True, mode=0o700)
        files = DiskFiles(slot, relative, self.folder / partial(relative),
                          self.folder / partial(hashes_file(slot, self.id)))  # fmt: skip
        self.disks.append(files)
        return files

    @property
    def partials(self) -> list[Path]:
        return [p for d in self.disks for p in (d.image, d.hashes)]

    def discard(self) -> None:
        if not self.published and not self.kept:
            for path in self.partials:
                path.unlink(missing_ok=True)


class ChainTx:
    """One host's chain while its lock is held. See the module doc."""

    def __init__(self, home: Home, images: ImageTool, host: str) -> None:
        self.home = home
        self.images = images
        self.host = host
        self.dir = home.chain_dir(host)
        self.chain = catalog.load(self.dir, host)
        self._drafts: list[NewPoint] = []

    # -- reading ---------------------------------------------------------------------------------------

    def file(self, relative: str) -> Path:
        """A file of the chain by its catalog name."""
        return self.dir / relative

    def hash_list(self, point_id: str, slot: str) -> Path:
        return self.dir / hashes_file(slot, point_id)

    def pins(self) -> dict[str, str]:
        """Points that must not be merged away: point id -> what uses it."""
        return recovery.pinned_points(self.home, self.host)

    def holds(self) -> dict[str, str]:
        """Points kept for a DR site that confirmed holding them (the next increment it pulls is cheapest
        against them), and points being sent to one now (`sending`): point id -> why. Older points may
        still be merged into them."""
        holds, _ = sites.replication_holds(self.home, self.host)
        holds = {**holds, **cloud.cloud_holds(self.home, self.host), **_live_sends(self.home.sends_dir(self.host))}
        return {k: v for k, v in holds.items() if k in self.chain.ids()}

    def needed_hash_lists(self) -> set[str]:
        """The hash lists to keep: the newest point's (the next backup compares to it), and those of every
        point a granted DR site may still ask for (from the oldest one a site confirmed, or all of them
        while a granted site confirmed nothing of this host)."""
        points = self.chain.points
        if not points:
            return set()
        holds, unconfirmed = sites.replication_holds(self.home, self.host)
        if any(point_id not in self.chain.ids() for point_id in holds):
            unconfirmed = True  # a point of a chain since removed (a held point is never merged away)
        confirmed = [i for i, p in enumerate(points) if p.id in holds]
        first = 0 if unconfirmed else min(confirmed, default=len(points) - 1)
        return {hashes_file(d.slot, p.id) for p in points[first:] for d in p.disks}

    @property
    def run_dir(self) -> Path:
        """Where this host's jobs keep their export files and sockets (emptied when the lock is taken)."""
        return self.home.run_dir / self.host

    # -- writing a point -------------------------------------------------------------------------------

    def new_point(self, point_id: str) -> NewPoint:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        draft = NewPoint(point_id, self.dir)
        self._drafts.append(draft)
        return draft

    def publish(self, draft: NewPoint, point: Point) -> None:
        """Make a written point durable and list it last (see the module doc for why this is atomic)."""
        with full_disk_as_store_full(f"{self.host}'s new point"):
            for path in draft.partials:
                fsync_file(path)
            final = [path.with_name(path.name[1 : -len(".part")]) for path in draft.partials]
            write_json(self.dir / INTENT, {"point": draft.id, "files": [f"{p.parent.name}/{p.name}" for p in final]})
            checkpoint("capture.before_rename")
            for path, target in zip(draft.partials, final, strict=True):
                os.rename(path, target)
                checkpoint("capture.renaming")
            for folder in {p.parent for p in final}:
                fsync_dir(folder)
            draft.published = True
            checkpoint("capture.before_catalog")
            self._save(self.chain.appended(point))
            checkpoint("capture.after_catalog")
        (self.dir / INTENT).unlink()
        (self.dir / PARTIAL).unlink(missing_ok=True)
        self._drop_old_hash_lists()

    def partial_point(self) -> Partial | None:
        """The point a cut run kept for this one to go on with, if any (and still valid: see `Partial`)."""
        path = self.dir / PARTIAL
        return read_as(path, Partial) if path.exists() else None

    def partial_files(self, point_id: str, slot: str) -> tuple[Path, Path]:
        """The image and hash list a partial point of `point_id` keeps for one disk (see NewPoint.disk)."""
        return self.dir / partial(point_file(slot, point_id)), self.dir / partial(hashes_file(slot, point_id))

    def keep_partial(self, draft: NewPoint, at: Partial) -> None:
        """Record that `draft` is written up to `at` (its files fsynced first), and keep its files when the
        transaction ends: the next run goes on from there."""
        with full_disk_as_store_full(f"{self.host}'s partial point"):
            for path in draft.partials:
                fsync_file(path)
            write_json(self.dir / PARTIAL, dataclasses.asdict(at))
        draft.kept = True

    def drop_partial(self) -> None:
        """Forget a kept partial point and delete its files (it cannot be gone on with)."""
        if not (self.dir / PARTIAL).exists():
            return
        partial_point = self._partial_or_none()
        if partial_point is not None:
            for folder in (f for f in self.dir.iterdir() if f.is_dir()):
                for f in folder.iterdir():
                    if _of_partial(f.name, partial_point.point):
                        f.unlink()
        (self.dir / PARTIAL).unlink(missing_ok=True)
        for draft in self._drafts:
            draft.kept = False
        log.info("chain.partial_dropped", host=self.host, point=partial_point.point if partial_point else None)

    def _partial_or_none(self) -> Partial | None:
        try:
            return self.partial_point()
        except DamagedFileError as exc:  # a damaged record: its files cannot be trusted; they go
            log.warning("chain.partial_damaged", host=self.host, error=exc.message)
            return None

    def write_hash_list(self, point_id: str, slot: str, hashes: bytes) -> None:
        """Replace a point's block hash list (a repair from the point's own content)."""
        write_atomic(self.hash_list(point_id, slot), hashes)

    def record(self, point: Point) -> None:
        """Replace one point's record (same id): a verification, a boot verdict."""
        self._save(self.chain.with_point(point))

    def _save(self, chain: Chain) -> None:
        catalog.save(self.dir, chain)
        self.chain = chain

    def _drop_old_hash_lists(self) -> None:
        """Only the newest point's hash lists are needed (the next incremental compares to them), and those
        a DR site may still ask for (`needed_hash_lists`)."""
        needed = self.needed_hash_lists()
        for p in self.chain.points[:-1]:
            for d in p.disks:
                if hashes_file(d.slot, p.id) not in needed:
                    self.hash_list(p.id, d.slot).unlink(missing_ok=True)

    # -- merging ---------------------------------------------------------------------------------------

    def finish_merges(self) -> None:
        """Complete every merge an interruption left half done."""
        for point in [p for p in self.chain.points if p.dropping]:
            log.warning("chain.merge_resumed", host=self.host, point=point.id)
            self.merge(point)

    def merge(self, point: Point) -> None:
        """Merge `point` into its child, disk by disk, and remove it from the catalog. See the module doc."""
        index = self.chain.index(point.id)
        if index == len(self.chain.points) - 1:
            raise ChainCorruptError(f"{self.host}: refusing to drop the newest point {point.id}")
        child = self.chain.points[index + 1]
        child_slots = {d.slot for d in child.disks}
        pending = [d for d in point.disks if self.file(d.file).exists() and d.slot in child_slots]
        for disk in pending:  # before anything changes: a damaged point stops the merge with all kept as it was
            self.images.check(self.file(disk.file))
            self.images.check(self.file(child.disk(disk.slot).file))
        if not point.dropping:
            point = replace(point, dropping=True)
            self.record(point)
            checkpoint("consolidate.marked")
        with full_disk_as_store_full(f"merging {self.host}'s point {point.id}"):
            for disk in point.disks:
                self._merge_disk(disk.file, child.disk(disk.slot) if disk.slot in child_slots else None)
        self._save(Chain(self.host, tuple(p for p in self.chain.points if p.id != point.id)))
        log.info("chain.merged", host=self.host, point=point.id, into=child.id)

    def _merge_disk(self, relative: str, child: DiskPoint | None) -> None:
        merged = self.file(relative)
        if not merged.exists():
            return  # this disk was merged and renamed before an interruption
        if child is None:
            merged.unlink()  # the disk was removed from the host after this point: nothing reads it
            return
        top = self.file(child.file)
        self.images.commit(top)
        checkpoint("consolidate.committed")
        if self.images.virtual_size(merged) != self.images.virtual_size(top):
            self.images.resize(merged, child.size)  # the child's disk had shrunk
        fsync_file(merged)
        os.rename(merged, top)
        fsync_dir(top.parent)
        checkpoint("consolidate.renamed")

    # -- putting the store in order ----------------------------------------------------------------------

    def remove_leftovers(self) -> None:
        """Delete what an interrupted run left behind.

        Safe by construction: `.part` files are never listed; hash lists of listed points other than the
        newest (and those a DR site may still ask for) are no longer needed; and an unlisted point file is
        removed only if the publishing intent of an interrupted run names it. Any other unlisted point file
        (say, the catalog was lost) is refused: recovery points are never deleted on a guess.
        """
        if self.run_dir.exists():
            for entry in self.run_dir.iterdir():
                self.images.unmount_stale(entry)
                entry.unlink(missing_ok=True)
        if not self.dir.exists():
            return
        published = self._unfinished_publication()
        needed = self.needed_hash_lists()
        listed = self.chain.referenced_files()
        kept = self._kept_partial()
        doomed, strangers = [], []
        for folder in (f for f in self.dir.iterdir() if f.is_dir()):
            for f in folder.iterdir():
                relative = f"{folder.name}/{f.name}"
                if kept and _of_partial(f.name, kept):
                    continue
                if _is_leftover(relative, published, needed):
                    doomed.append(f)
                elif f.name.endswith(".qcow2") and relative not in listed:
                    strangers.append(relative)
        if strangers:
            shown = ", ".join(sorted(strangers)[:3]) + (", ..." if len(strangers) > 3 else "")
            raise ChainCorruptError(
                f"{self.host}: {len(strangers)} point files are not in the catalog ({shown}); not touching them",
                hint=f"the catalog {self.dir / catalog.NAME} may have been lost or replaced; restore it from a copy",
            )
        doomed += [f for f in self.dir.glob(".*.tmp") if f.is_file()]  # an atomic write cut short
        for f in doomed:
            log.info("store.leftover_removed", host=self.host, file=str(f.relative_to(self.dir)))
            f.unlink()
        (self.dir / INTENT).unlink(missing_ok=True)

    def _kept_partial(self) -> str | None:
        """The id of the partial point to keep, if its record reads and it was written on the chain's newest
        point (a merge into the newest keeps its name and content); otherwise the record goes (and then its
        files with the other leftovers)."""
        partial_point = self._partial_or_none()
        newest = self.chain.newest
        if partial_point is not None and partial_point.base == (newest.id if newest else None):
            return partial_point.point
        if (self.dir / PARTIAL).exists():
            log.info("chain.partial_stale", host=self.host, point=partial_point.point if partial_point else None)
            (self.dir / PARTIAL).unlink()
        return None

    def _unfinished_publication(self) -> set[str]:
        """The files an interrupted publication renamed into place, if its point never reached the catalog."""
        path = self.dir / INTENT
        if not path.exists():
            return set()
        intent = read_as(path, _Intent)  # damaged: nothing is removed on a guess
        return set() if intent.point in self.chain.ids() else set(intent.files)

    def discard_drafts(self) -> None:
        for draft in self._drafts:
            if not draft.published and not draft.kept and (self.dir / PARTIAL).exists():
                partial_point = self._partial_or_none()
                if partial_point is None or partial_point.point == draft.id:
                    (self.dir / PARTIAL).unlink()  # its files go now: nothing left to go on with
            draft.discard()
        self._drafts = []


def _of_partial(name: str, point_id: str) -> bool:
    """Whether a file in a slot folder is one of the `.part` files of point `point_id` (see NewPoint.disk)."""
    return name.startswith(f".{point_id}.") and name.endswith(".part")


def _is_leftover(relative: str, published: set[str], needed_hashes: set[str]) -> bool:
    """Partial files, files an unfinished publication renamed, hash lists nothing compares to any more."""
    name = relative.rpartition("/")[2]
    unneeded_hashes = name.endswith(".hashes") and relative not in needed_hashes
    return name.endswith(".part") or relative in published or unneeded_hashes


@contextmanager
def sending(home: Home, images: ImageTool, host: str, point_id: str, site: str) -> Iterator[Path]:
    """While a point of `host` is sent to DR site `site`: the point is held from being merged away (a
    merge would change its file under the send), and the send has a folder of its own for its exports.

    Entered under the host's lock (so a merge sees the pin or no send at all); it then outlives the lock.
    The pin is a file the send holds an flock on: the kernel lets go of it when the send's process dies,
    so a killed send holds nothing (and the next send removes what it left)."""
    folder = home.sends_dir(host)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_dead_sends(folder, images)
    pin = folder / f"{os.getpid()}.pin"
    fd = os.open(pin, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    exports = folder / str(os.getpid())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"point": point_id, "site": site}).encode())
        exports.mkdir(exist_ok=True, mode=0o700)
        yield exports
    finally:
        pin.unlink(missing_ok=True)
        os.close(fd)
        with contextlib.suppress(OSError):
            exports.rmdir()


def _live_sends(folder: Path) -> dict[str, str]:
    """Point id -> "sending to site X" for every send whose process still holds its pin."""
    live = {}
    for pin in folder.glob("*.pin") if folder.exists() else []:
        with contextlib.suppress(OSError, ValueError, KeyError):
            doc = _held_pin(pin)
            if doc is not None:
                live[str(doc["point"])] = f"sending to site {doc['site']}"
    return live


def _held_pin(pin: Path) -> dict[str, object] | None:
    """What a send's pin says, while its process holds it; None once nobody does (the send died)."""
    fd = os.open(pin, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            doc = json.loads(os.pread(fd, 4096, 0))
            return doc if isinstance(doc, dict) else {}
    finally:
        os.close(fd)


def _remove_dead_sends(folder: Path, images: ImageTool) -> None:
    """The pins and exports of sends whose process died (killed: no cleanup of their own)."""
    for pin in folder.glob("*.pin"):
        try:
            if _held_pin(pin) is not None:
                continue  # alive
        except ValueError:
            continue  # held, but its record is being written: alive
        exports = folder / pin.stem
        for entry in exports.iterdir() if exports.is_dir() else []:
            images.unmount_stale(entry)
            entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            exports.rmdir()
        pin.unlink(missing_ok=True)
        log.info("chain.dead_send_removed", host=folder.name, pid=pin.stem)


@contextmanager
def open(home: Home, images: ImageTool, host: str, purpose: str, *, wait: float = 0.0) -> Iterator[ChainTx]:  # noqa: A001
    """Take `host`'s lock (waiting up to `wait` seconds), load its chain and put its store in order.

    Points being written and not published when the block ends (an error, a signal) are removed.

    :raises ChainLockedError: another job holds the host.
    :raises DamagedFileError: the catalog or an intent is damaged (the message names the file).
    :raises ChainCorruptError: point files are not listed in the catalog.
    """
    with HostLock(home.chain_dir(host) / "lock", host, purpose, wait=wait):
        tx = ChainTx(home, images, host)
        tx.remove_leftovers()
        try:
            yield tx
        finally:
            tx.discard_drafts()
