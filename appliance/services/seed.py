# SPDX-License-Identifier: GPL-2.0-or-later
"""Seeding by disk: a host's newest point carried to a DR site as plain files, so that the first full copy of
a large host need not cross the WAN.

`export_host` (on the source) writes DIR/<host>/: per disk one standalone qcow2 (the point flattened by
QEMU) and its block hash list, and `manifest.json`: the point's record as the source's catalog holds it,
the host's replication settings, every file's size and sha256. It is written under a hidden name, the
manifest last, and renamed into place whole: a cut export is never taken for a whole one.

`import_seeds` (on the DR site) checks every name (they become paths) and every file's sha256, then adopts
each point as the first point of a replica chain of its host: read through QEMU into a new overlay as any
import is, every block hashed again, and published only if each disk adds up to the digest the source
recorded (proven on arrival, as a replicated point is). The point keeps the source's id, time and
digests: the next `replicate` finds it at the source and pulls only the blocks that differ from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.domain.blocks import HASH_LEN, block_count
from appliance.domain.models import HOST_NAME, Host, Point, Site, format_size, slot_name
from appliance.errors import ChainCorruptError, ConfigError, DamagedFileError, StoreFullError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.backup import Import, record_point
from appliance.services.replicate import replica_host
from appliance.store import catalog, chains, hosts, sites
from appliance.store.catalog import check_point_names, point_doc
from appliance.store.files import as_type, damaged, fsync_dir, fsync_file, read_json, write_json
from appliance.store.hashes import digest_of
from appliance.store.layout import Home
from appliance.transfer import replica

log = get_logger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
_QCOW2_CLUSTER = 65536  # qemu-img convert's default cluster size for the flattened images
_READ = 4 << 20

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SeedFile:
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an export holds: one point of one host, and how to check every file of it."""

    format: int
    host: str
    exported: datetime
    settings: dict[str, object]  # replica.SETTINGS of the host at the source
    point: Point
    files: dict[str, SeedFile]  # name in the export's folder -> its size and sha256


@dataclass(frozen=True, slots=True)
class Exported:
    host: str
    point: str
    folder: Path
    bytes: int


@dataclass(frozen=True, slots=True)
class Imported:
    host: str
    point: Point
    site: str


def seed_files(point: Point) -> list[str]:
    """The files of an export of `point`, in the order they are written: per disk its image, its hash list."""
    return [name for d in point.disks for name in (f"{d.slot}.qcow2", f"{d.slot}.hashes")]


def room_needed(size: int, zero_extents: list[tuple[int, int]], block_size: int) -> int:
    """Bytes one disk's files take at most on the export's disk: every qcow2 cluster that holds data (what
    does not read as zeroes, rounded out to whole clusters), the qcow2's tables (8 bytes of L2 and 2 of
    refcount a cluster, headers), and the hash list."""
    cluster = _QCOW2_CLUSTER
    allocated, pos = 0, 0
    for start, length in [*sorted(zero_extents), (size, 0)]:
        start = min(start, size)
        if start > pos:  # data in [pos, start): the clusters it touches
            allocated += (block_count(start, cluster) - pos // cluster) * cluster
        pos = max(pos, start + length)
    clusters = block_count(size, cluster)
    return min(allocated, clusters * cluster) + clusters * 10 + (1 << 20) + block_count(size, block_size) * HASH_LEN


# -- export (on the source) ----------------------------------------------------------------------------------


def export_host(home: Home, tools: Tools, name: str, target: Path, *, force: bool = False) -> Exported:
    """Write `name`'s newest point into `target`/<name>/ (see the module doc). The host's chain is locked
    only while its files are copied; the sha256 sums and the manifest come after.

    :raises ConfigError: no such folder, an export of the host already there (unless `force`), no points.
    :raises StoreFullError: the target disk has no room for it (checked before anything is written).
    :raises ImageToolError, ChainCorruptError: the point does not read; nothing is left in `target`.
    """
    host = hosts.load(home, name)
    if not target.is_dir():
        raise ConfigError(f"{target} is not a folder", hint="mount the disk and name a folder on it")
    dest = target / name
    _check_destination(dest, force)
    started = time.monotonic()
    with _writing_to(target):
        _remove_cut_exports(target, name)
        # 0700, hidden (never taken for an export), named after this process (a later export removes it if cut)
        staging = Path(tempfile.mkdtemp(dir=target, prefix=f".{name}.export-{os.getpid()}-"))
    try:
        with chains.open(home, tools.images, name, "export") as tx:
            point = tx.chain.newest
            if point is None:
                raise ConfigError(f"{name} has no points to export", hint=f"`appliance backup {name}` takes one")
            _check_room(tools, tx, point, target)
            with _writing_to(target):
                for disk in point.disks:
                    hash_list = tx.hash_list(point.id, disk.slot)
                    if not hash_list.exists():
                        raise ChainCorruptError(
                            f"{name}: the block hash list of point {point.id} ({disk.slot}) is missing",
                            hint=f"run `appliance verify {name} --repair` to rebuild it from the point",
                        )
                    tools.images.flatten(tx.file(disk.file), staging / f"{disk.slot}.qcow2")
                    shutil.copyfile(hash_list, staging / f"{disk.slot}.hashes")
        # The chain is free again: what follows reads the export's own files.
        with _writing_to(target):
            files = {}
            for file in seed_files(point):
                path = staging / file
                os.chmod(path, 0o600)
                fsync_file(path)
                files[file] = _describe(path)
            for disk in point.disks:
                if digest_of(staging / f"{disk.slot}.hashes") != disk.digest:
                    raise ChainCorruptError(
                        f"{name}: the block hash list of point {point.id} ({disk.slot}) does not add up to its digest",
                        hint=f"run `appliance verify {name} --repair` to rebuild it from the point",
                    )
            settings = replica.settings_of(host)
            write_json(staging / MANIFEST, {
                "format": FORMAT, "host": name, "exported": datetime.now(UTC).isoformat(), "settings": settings,
                "point": point_doc(point), "files": {f: {"size": d.size, "sha256": d.sha256} for f, d in files.items()},
            })  # fmt: skip
            _put_in_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    total = sum(f.size for f in files.values())
    log.info("seed.exported", host=name, point=point.id, folder=str(dest), bytes=total,
             seconds=round(time.monotonic() - started, 2))  # fmt: skip
    return Exported(name, point.id, dest, total)


def _remove_cut_exports(target: Path, name: str) -> None:
    """The hidden folders of exports of `name` whose process is gone (killed, or the machine stopped)."""
    for folder in target.glob(f".{name}.export-*"):
        pid = folder.name.removeprefix(f".{name}.export-").partition("-")[0]
        if folder.is_dir() and not folder.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            log.info("seed.leftover_removed", host=name, folder=str(folder))
            shutil.rmtree(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_destination(dest: Path, force: bool) -> None:
    if not dest.exists() and not dest.is_symlink():
        return
    if not (dest.is_dir() and not dest.is_symlink() and (dest / MANIFEST).is_file()):
        raise ConfigError(f"{dest} exists and is not an export; not touching it",
                          hint="remove it, or export into another folder")  # fmt: skip
    if not force:
        raise ConfigError(f"{dest} already holds an export of {dest.name}",
                          hint="`--force` replaces it, or export into another folder")  # fmt: skip


def _check_room(tools: Tools, tx: chains.ChainTx, point: Point, target: Path) -> None:
    needed = sum(room_needed(d.size, tools.images.map_zero_extents(tx.file(d.file)), d.block_size) for d in point.disks)
    st = os.statvfs(target)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise StoreFullError(
            f"{target} has {format_size(free)} free; the export of {tx.host}'s point {point.id} needs about "
            f"{format_size(needed)}; nothing was written",
            hint="use a larger disk, or free space on it",
        )


@contextlib.contextmanager
def _writing_to(target: Path) -> Iterator[None]:
    """A full target disk, or one that refuses writes, as one line naming it (not the appliance's store)."""
    try:
        yield
    except StoreFullError as exc:
        raise StoreFullError(f"{target} is full; the export was removed", hint="use a larger disk") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(f"{target} is full; the export was removed", hint="use a larger disk") from exc
        raise ConfigError(f"cannot write the export in {target}: {exc.strerror or exc}") from exc


def _put_in_place(staging: Path, dest: Path) -> None:
    """The whole folder appears at once under its name; an export it replaces goes only after."""
    fsync_dir(staging)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.replaced-"))
        os.rename(dest, old / dest.name)
    os.rename(staging, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old)


def _describe(path: Path) -> SeedFile:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while data := f.read(_READ):
            digest.update(data)
            size += len(data)
    return SeedFile(size, digest.hexdigest())


# -- import (on the DR site) ---------------------------------------------------------------------------------


def find_manifests(folder: Path) -> list[Path]:
    """The manifests an import reads: `folder` is one export (DIR/<host>), or holds one per host (DIR)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder", hint="mount the disk and name the folder of the export")
    if (folder / MANIFEST).is_file():
        return [folder / MANIFEST]
    found = sorted(p / MANIFEST for p in folder.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())  # fmt: skip
    if not found:
        raise ConfigError(
            f"{folder} holds no export (no {MANIFEST} in it or in a folder of it)",
            hint="`appliance site export HOST DIR` on the source writes one; an export cut short has none",
        )
    return found


def read_manifest(path: Path) -> Manifest:
    """An export's manifest, every name in it checked (host, point id, slots, files: they become paths).

    :raises ConfigError: an export of another format.
    :raises DamagedFileError: not a manifest this appliance writes; the message names the file.
    """
    try:
        doc = read_json(path)
        found = doc.get("format") if isinstance(doc, dict) else None
        if found != FORMAT:
            raise ConfigError(f"{path} is an export of format {found!r}; this appliance reads format {FORMAT}",
                              hint="export the host again with this appliance's version")  # fmt: skip
        manifest = as_type(doc, Manifest, path)
        if not HOST_NAME.match(manifest.host):
            raise damaged(path, f"{manifest.host!r} is not a host name")
        point = manifest.point
        check_point_names(path, point)
        if not point.disks or [d.slot for d in point.disks] != [slot_name(i) for i in range(len(point.disks))]:
            raise damaged(path, f"point {point.id} does not list its disks in order")
        disks = manifest.settings.get("disks")
        if not isinstance(disks, list) or len(disks) != len(point.disks) or not all(isinstance(d, str) for d in disks):
            raise damaged(path, f"the settings of {manifest.host} do not list the point's {len(point.disks)} disk(s)")
        if sorted(manifest.files) != sorted(seed_files(point)):
            raise damaged(path, f"it lists other files than those of point {point.id}'s disks")
    except DamagedFileError as exc:
        raise DamagedFileError(exc.message, hint="export the host again on the source") from exc
    return manifest


def import_seeds(home: Home, tools: Tools, folder: Path, site_name: str | None = None,
                 say: Say = lambda _: None) -> list[Imported]:  # fmt: skip
    """Adopt every export in `folder` (see the module doc) as a replica of `site_name` (default: the only
    site configured). Every manifest, and every host's state here, is checked before any point is read.

    :raises ConfigError: no export there, no such site or not one site, a host that already has points here.
    :raises DamagedFileError: a file of an export is missing or damaged (named); that host gets nothing.
    :raises ChainCorruptError: an image does not read as the digests its point recorded; nothing of it kept.
    """
    manifests = [(path.parent, read_manifest(path)) for path in find_manifests(folder)]
    seen: dict[str, Path] = {}
    for export, manifest in manifests:
        if manifest.host in seen:
            raise ConfigError(f"{folder} holds two exports of {manifest.host} ({seen[manifest.host]}, {export})",
                              hint="import the folder of the one to adopt")  # fmt: skip
        seen[manifest.host] = export
    site = _site(home, site_name, [m.host for _, m in manifests])
    for _, manifest in manifests:
        _check_host_here(home, site, manifest.host)
    done = []
    for export, manifest in manifests:
        say(f"{manifest.host}: checking the export in {export}")
        _check_files(export, manifest)
        say(f"{manifest.host}: reading point {manifest.point.id} through QEMU")
        done.append(_adopt(home, tools, site, export, manifest))
    return done


def _site(home: Home, name: str | None, hosts_seeded: list[str]) -> Site:
    if name is not None:
        return sites.load(home, name)
    names = sites.names(home)
    if len(names) == 1:
        return sites.load(home, names[0])
    seeded = ", ".join(hosts_seeded)
    if not names:
        raise ConfigError(f"no site is configured here to replicate {seeded} from",
                          hint="`appliance site add NAME ...` the source first")  # fmt: skip
    raise ConfigError(f"{len(names)} sites are configured here ({', '.join(names)}): which one is {seeded} from?",
                      hint="name it with --site")  # fmt: skip


def _check_host_here(home: Home, site: Site, name: str) -> None:
    if not hosts.exists(home, name):
        return
    host = hosts.load(home, name)
    if host.replica_of != site.name:
        raise ConfigError(
            f"{name} is a host of this appliance" if not host.replica_of
            else f"{name} is a replica of site {host.replica_of}, not of site {site.name}",
            hint="a seed starts a replica of a host this appliance does not hold yet",
        )  # fmt: skip
    held = catalog.load(home.chain_dir(name), name).points
    if held:
        raise ConfigError(f"{name} already has {len(held)} point(s) here; a seed starts only a host that has none",
                          hint=f"`appliance replicate {site.name} {name}` pulls what it lacks")  # fmt: skip


def _check_files(export: Path, manifest: Manifest) -> None:
    """Every file is there, of its size and sha256, and each hash list adds up to its disk's digest."""
    for name, want in sorted(manifest.files.items()):
        path = export / name
        if not path.is_file():
            raise DamagedFileError(f"{path} is missing from the export of {manifest.host}; nothing was imported",
                                   hint="export the host again on the source")  # fmt: skip
        try:
            found = _describe(path)
        except OSError as exc:
            raise DamagedFileError(f"cannot read {path}: {exc.strerror or exc}; nothing was imported") from exc
        if found != want:
            what = f"is {found.size} bytes, not {want.size}" if found.size != want.size else "does not match its sha256"
            raise DamagedFileError(f"{path} {what} (manifest); the export is damaged and nothing was imported",
                                   hint="export the host again on the source")  # fmt: skip
    for disk in manifest.point.disks:
        if digest_of(export / f"{disk.slot}.hashes") != disk.digest:
            raise DamagedFileError(f"{export / disk.slot}.hashes does not add up to the digest of point "
                                   f"{manifest.point.id}; nothing was imported",
                                   hint="export the host again on the source")  # fmt: skip


def _adopt(home: Home, tools: Tools, site: Site, export: Path, manifest: Manifest) -> Imported:
    settings = {k: v for k, v in manifest.settings.items() if k in replica.SETTINGS}
    created = not hosts.exists(home, manifest.host)
    host = replica_host(home, site, replica.SourceHost(manifest.host, settings, ()))
    try:
        with chains.open(home, tools.images, host.name, "seed") as tx:
            if tx.chain.points:  # a replication took the host since the check
                raise ConfigError(f"{host.name} already has points here; a seed starts only a host that has none")
            point = record_point(tx, _Seed(tx, tools, host, site, export, manifest.point), "seed")
    except BaseException:
        if created:  # this appliance is left as it was: no record of a host it holds nothing of
            hosts.remove(home, host.name)
        raise
    log.info("seed.imported", host=host.name, point=point.id, site=site.name, folder=str(export))
    return Imported(host.name, point, site.name)


class _Seed(Import):
    """An exported point read into the first overlay of the host's chain, under the source's id and time,
    kept only if every disk adds up to the digest the source recorded."""

    def __init__(self, tx: chains.ChainTx, tools: Tools, host: Host, site: Site, export: Path, source: Point) -> None:
        sources = [(d.source, export / f"{d.slot}.qcow2", d.size) for d in source.disks]
        super().__init__(tx, tools, host, sources, f"seed from site {site.name}", point=(source.id, source.created))
        self.site, self.source = site, source

    def _block_size(self, slot: str) -> int:
        """The point's own block size (the host's setting may have changed since): its digests are of those."""
        return self.source.disk(slot).block_size

    def run(self, started: float) -> Point:
        read = super().run(started)
        source = self.source
        for mine, theirs in zip(read.disks, source.disks, strict=True):
            if mine.digest != theirs.digest:
                raise ChainCorruptError(
                    f"{self.host.name} {mine.slot}: the exported image of point {source.id} does not read as the "
                    f"digest site {self.site.name} recorded ({mine.digest[:12]} != {theirs.digest[:12]}); "
                    "nothing was imported",
                    hint="export the host again on the source",
                )
        return dataclasses.replace(read, wire_bytes=0, consistency=source.consistency,
                                   extra=replica.origin("seed from", self.site.name, source))  # fmt: skip
