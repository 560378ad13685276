# SPDX-License-Identifier: GPL-2.0-or-later
"""Replication: this appliance (the DR site) pulls every point of another (the source site) it lacks.

Each point arrives as the blocks that differ from this appliance's newest point of the host, as the
source finds them from both sides' hash lists (services/replica_source.py), and is written as a new
overlay on this appliance's own chain of the host: the same receiver as a backup (every block re-hashed
against the hash sent with it, the disk's digest checked at its end, and then against the digest the
source recorded for the point). The point is published only whole, under the same id as at the source;
a run cut anywhere leaves the chain as it was. The source holds no key to this appliance: the DR site
pulls, with a key the source granted only `serve-replica`.
"""

from __future__ import annotations

import base64
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.domain.blocks import HASH_LEN, block_count
from appliance.domain.models import Host, Point, Site, parse_address, slot_name, validate_new_host_name
from appliance.domain.schedule import REPLICATE, Window, parse_window
from appliance.errors import (
    ApplianceError,
    ChainCorruptError,
    ConfigError,
    ConnectionLostError,
    DamagedFileError,
    ProtocolViolationError,
    RemoteCommandError,
)
from appliance.faults import checkpoint
from appliance.log import get_logger
from appliance.ports import RemoteStream, Tools
from appliance.services.backup import Capture, DiskReceiver, job_deadline, record_point
from appliance.services.hosts import ConfirmKey, pin_host_key
from appliance.services.pipeline import Pace
from appliance.services.reader_session import violation
from appliance.store import catalog, chains, hosts, schedule, sites
from appliance.store.layout import Home
from appliance.transfer import protocol, replica
from appliance.transfer.protocol import DataRun, Finished, Hello, ZeroRun

log = get_logger(__name__)

# How much a pull receives between two records of what arrived (`chains.Partial`): what a pull killed
# outright fetches again at most. Each record costs a flush of the overlay and of its hash list.
CHECKPOINT_BYTES = 1 << 20

Say = Callable[[str], None]


# -- sites ------------------------------------------------------------------------------------------------


def add_site(
    home: Home, tools: Tools, *, name: str, address: str, port: int | None, key: Path, fingerprint: str | None,
    trust_first_use: bool = False, confirm: ConfirmKey | None = None, timeout: float = 60.0,
) -> tuple[Site, list[replica.SourceHost]]:  # fmt: skip
    """Pin the source site's key, keep the key to reach it, and ask its catalog (proof that the grant works).

    :raises ConfigError, HostKeyError, RemoteError:
    """
    validate_new_host_name(name)
    if sites.exists(home, name):
        raise ConfigError(f"a site named {name!r} already exists")
    if not key.is_file():
        raise ConfigError(f"SSH key {key} does not exist")
    user, address_only, final_port = parse_address(address, port)
    host_key = pin_host_key(tools, address_only, final_port, fingerprint=fingerprint, trust_first_use=trust_first_use,
                            confirm=confirm)  # fmt: skip
    site = Site(name, address_only, user, final_port, sites.install_key(home, name, key), host_key, timeout)
    try:
        with _session(tools, site) as (stream, records):
            found = _catalog(site, stream, records)
    except BaseException:
        sites.remove(home, name)
        raise
    sites.save(home, site)
    log.info("site.added", site=name, address=site.address, port=site.port, fingerprint=host_key.fingerprint)
    return site, found


def grant_line(site: str, public_key: str, command: list[str]) -> str:
    """The authorized_keys line that lets site `site` run only `command` (serve-replica) with that key:
    no shell, no port, agent or X11 forwarding, no terminal (`restrict`). The key is re-encoded from its
    type and base64, so a key file that carries options of its own grants nothing more.

    :raises ConfigError: not one OpenSSH public key.
    """
    fields = public_key.strip().split()
    if len(public_key.strip().splitlines()) != 1 or len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-")):
        raise ConfigError("the site's key must be one OpenSSH public key line (ssh-ed25519 AAAA... comment)")
    try:
        base64.b64decode(fields[1], validate=True)
    except ValueError as exc:
        raise ConfigError("the site's public key is not valid base64") from exc
    forced = shlex.join(command).replace('"', '\\"')
    return f'restrict,command="{forced}" {fields[0]} {fields[1]} {grant_comment(site)}'


def grant_comment(site: str) -> str:
    return f"appliance-site:{site}"


def grant(home: Home, site: str, public_key: Path, authorized_keys: Path, command: list[str]) -> str:
    """Install the grant for `site` in `authorized_keys` (replacing an earlier grant to the same site)."""
    validate_new_host_name(site)
    try:
        text = public_key.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the site's public key {public_key}: {exc.strerror}") from exc
    line = grant_line(site, text, command)
    sites.grant_site(home, site)
    sites.add_authorized_key(authorized_keys, line, grant_comment(site))
    log.info("site.granted", site=site, authorized_keys=str(authorized_keys))
    return line


# -- replicate ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class HostReport:
    host: str
    pulled: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    newest_there: str | None = None
    newest_here: str | None = None


def replicate(home: Home, tools: Tools, site_name: str, only: str | None = None, say: Say = lambda _: None,
              *, in_window: bool = False) -> list[HostReport]:  # fmt: skip
    """Pull every point of the site's hosts (or of `only`) newer than this appliance's newest, oldest first,
    taking at most the site's bandwidth. `in_window` (the daemon): start no point once the site's window
    has closed (the point under way finishes; the rest waits for the next window).

    :raises HostNotFoundError: no such site, or the site has no host `only`.
    :raises RemoteError, ChainError, StoreFullError: that point was not recorded; the next run resumes.
    """
    site = sites.load(home, site_name)
    window = parse_window(site.window) if in_window else None
    reports = []
    with _session(tools, site, throttled=True) as (stream, records):
        listed = _catalog(site, stream, records)
        if only is not None and only not in {h.name for h in listed}:
            raise ConfigError(f"site {site_name} has no host {only!r}")
        for source in listed:
            if only is None or source.name == only:
                reports.append(_replicate_host(home, tools, site, source, stream, records, say, window))
        stream.write(replica.encode({"op": "confirm", "held": _held(home, [r.host for r in reports])}))
    return reports


@contextmanager
def _session(
    tools: Tools, site: Site, *, throttled: bool = False
) -> Iterator[tuple[RemoteStream, protocol.RecordReader]]:
    """The site's `serve-replica` on a session of its own, its records read at no more than the site's
    bandwidth if `throttled`; closed (and waited for) at the end of the block."""
    with tools.remote.connect(site.endpoint()) as session:
        stream = session.start(["serve-replica"])
        receive = Throttle(stream.recv_some, site.bandwidth) if throttled and site.bandwidth else stream.recv_some
        yield stream, protocol.RecordReader(receive)
        stream.close_stdin()
        stream.wait(timeout=60)


@dataclass(frozen=True, slots=True)
class Lag:
    """One host of a site: its newest point there and here, and how far behind this appliance is."""

    site: str
    host: str
    newest_there: Point | None
    newest_here: Point | None
    missing: int  # points there newer than the newest here
    last_run: schedule.Outcome | None = None  # the daemon's last replication of the site
    error: str = ""  # the site could not be asked (then `host` is "-")

    @property
    def seconds(self) -> float:
        if self.newest_there is None or self.newest_here is None:
            return 0.0 if self.newest_there is None else float("inf")
        return max(0.0, (self.newest_there.created - self.newest_here.created).total_seconds())


def lags(home: Home, tools: Tools) -> list[Lag]:
    """Every host of every site: what is there and what is here (one catalog request per site); a site
    that cannot be asked is one row with the reason, and the other sites are asked all the same."""
    out = []
    try:
        history = schedule.load(home)
    except DamagedFileError:
        history = {}  # the daemon names the damaged file itself
    for name in sites.names(home):
        try:
            site = sites.load(home, name)
            with _session(tools, site) as (stream, records):
                listed = _catalog(site, stream, records)
        except ApplianceError as exc:
            out.append(Lag(name, "-", None, None, 0, history.get((REPLICATE, name)), exc.message))
            continue
        for source in listed:
            here = (
                catalog.load(home.chain_dir(source.name), source.name).newest
                if hosts.exists(home, source.name)
                else None
            )
            there = source.points[-1] if source.points else None
            missing = sum(1 for p in source.points if here is None or p.id > here.id)
            out.append(Lag(name, source.name, there, here, missing, history.get((REPLICATE, name))))
    return out


def _held(home: Home, names: list[str]) -> dict[str, dict[str, object]]:
    """The newest point of each host here, as the source names it (its id and digests)."""
    held: dict[str, dict[str, object]] = {}
    for name in names:
        newest = catalog.load(home.chain_dir(name), name).newest
        if newest is not None:
            held[name] = replica.point_ref(newest)
    return held


def _catalog(site: Site, stream: RemoteStream, records: protocol.RecordReader) -> list[replica.SourceHost]:
    stream.write(replica.encode({"op": "catalog"}))
    try:
        return replica.read_catalog(records.read_exact, site.name)
    except EOFError:
        raise ConnectionLostError(
            f"site {site.name} closed the session without answering",
            hint="is this appliance's key granted there (`appliance site grant` on the source)?",
        ) from None
    except replica.RemoteRefusal as exc:
        raise ConfigError(f"site {site.name} refused the catalog: {exc}") from exc
    except protocol.ProtocolError as exc:
        raise ConfigError(f"site {site.name} does not speak this appliance's replication: {exc}") from exc


def _replicate_host(home: Home, tools: Tools, site: Site, source: replica.SourceHost, stream: RemoteStream,
                    records: protocol.RecordReader, say: Say, window: Window | None) -> HostReport:  # fmt: skip
    host = replica_host(home, site, source)
    report = HostReport(host.name, newest_there=source.points[-1].id if source.points else None)
    with chains.open(home, tools.images, host.name, "replication") as tx:
        newest = tx.chain.newest
        wanted = [p for p in source.points if newest is None or p.id > newest.id]
        for point in wanted:
            if window is not None and not window.is_open(datetime.now(UTC)):
                log.info("replica.window_closed", site=site.name, host=host.name, window=str(window),
                         waiting=len(wanted) - len(report.pulled) - len(report.skipped))  # fmt: skip
                break
            say(f"{host.name}: pulling point {point.id} from {site.name}")
            try:
                pull = _Pull(tx, tools, host, site, point, stream, records)
                report.pulled.append(record_point(tx, pull, "replication"))
            except _Skipped as exc:  # an older point the source no longer keeps the hashes of: the next one
                tx.drop_partial()
                log.info("replica.skipped", site=site.name, host=host.name, point=point.id, reason=str(exc))
                report.skipped.append(point.id)
        report.newest_here = tx.chain.newest.id if tx.chain.newest else None
    return report


def replica_host(home: Home, site: Site, source: replica.SourceHost) -> Host:
    """This appliance's record of a host of the site: created on first sight, its settings kept in step."""
    settings = source.settings
    disks = settings.get("disks")
    if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
        raise ConfigError(f"site {site.name} lists {source.name} without its disks")
    if hosts.exists(home, source.name):
        host = hosts.load(home, source.name)
        if host.replica_of != site.name:
            raise ConfigError(
                f"{source.name} is a host of this appliance, not a replica of site {site.name}",
                hint="a site's host and a local host cannot share a name",
            )
    else:
        host = Host(name=source.name, address=site.address, user=site.user, port=site.port, key_file=site.key_file,
                    host_key=site.host_key, disks=tuple(disks), replica_of=site.name)  # fmt: skip
    updated = replica.with_settings(replace(host, disks=tuple(disks)), settings)
    hosts.save(home, updated)
    return updated


class Throttle:
    """`recv_some` at no more than `rate` bytes a second on average: it sleeps when ahead, and TCP's own
    flow control then slows the source (nothing piles up on either side)."""

    def __init__(self, recv_some: Callable[[], bytes], rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.recv_some = recv_some
        self.pace = Pace(rate, clock, sleep)

    @property
    def received(self) -> int:
        return self.pace.sent

    def __call__(self) -> bytes:
        self.pace.wait()
        data = self.recv_some()
        self.pace.sent += len(data)
        return data


class _Skipped(Exception):
    """The source cannot send this point as an increment any more; the next one will do."""


class _Pull(Capture):
    """One point of the source, received as a backup receives one (see the module doc).

    A pull cut part-way (the link, the source, this appliance's disk full, this appliance killed) keeps
    what it received (`chains.Partial`): every CHECKPOINT_BYTES, and at the moment it is cut when this
    process is still there to see it, the blocks received so far are checked, flushed and recorded. The
    next pull of the same point on the same newest point asks the source to go on from there; anything
    else (another point, another base, a block that failed its check) starts afresh."""

    def __init__(self, tx: chains.ChainTx, tools: Tools, host: Host, site: Site, source: Point, stream: RemoteStream,
                 records: protocol.RecordReader) -> None:  # fmt: skip
        super().__init__(tx, tools, host, point=(source.id, source.created))
        self.site, self.source, self.stream, self.records = site, source, stream, records
        self.at = (0, 0)  # (disk, block): every block before it is received, written and checked
        self.unsynced = 0  # bytes written since the last checkpoint
        self.base: dict[str, Any] | None = None  # this appliance's newest point, as the source names it

    def run(self, started: float) -> Point:
        stream, records, source = self.stream, self.records, self.source
        sent, received = stream.bytes_sent, stream.bytes_received
        previous = self.chain.newest
        self.base = base = None if previous is None else replica.point_ref(previous)
        kept = self._kept()
        self.at = (kept.disk, kept.block) if kept else (0, 0)
        self.draft.kept = kept is not None  # a cut before anything arrives keeps what the last pull kept
        request: dict[str, object] = {"op": "point", "host": self.host.name, "point": source.id, "base": base,
                                      "compress": replica.COMPRESS}  # fmt: skip
        if kept is not None:
            request["resume"] = {"disk": kept.disk, "block": kept.block}
            log.info("replica.resumed", site=self.site.name, host=self.host.name, point=source.id, disk=kept.disk,
                     block=kept.block)  # fmt: skip
        self._set_deadline(stream, job_deadline(self.host, started, 0))
        stream.write(replica.encode(request))
        records.accept_compressed()
        hello = self._hello(records, stream)
        self.progress.total = sum(d.size for d in source.disks)
        self._set_deadline(stream, job_deadline(self.host, started, self.progress.total))
        plans = [self._plan_disk(i, d.size, d.block_size, previous, create=kept is None)
                 for i, d in enumerate(source.disks)]  # fmt: skip
        sender = None
        if not hello.base_known:
            sender = threading.Thread(target=self._send_old_hashes, args=(stream, plans, self.at), daemon=True)
            sender.start()
        with ExitStack() as stack:
            receivers = [stack.enter_context(DiskReceiver(self, plan, d.source, resume=kept is not None))
                         for plan, d in zip(plans, source.disks, strict=True)]  # fmt: skip
            self._receive(records, stream, receivers)
        if sender is not None:
            self._join_sender(sender, stream)
        disks = [rx.finish(0) for rx in receivers]
        return Point(
            id=source.id, created=source.created, seconds=time.monotonic() - started, disks=tuple(disks),
            wire_bytes=stream.bytes_sent - sent + stream.bytes_received - received, consistency=source.consistency,
            extra=replica.origin("replica of", self.site.name, source),
        )  # fmt: skip

    def _kept(self) -> chains.Partial | None:
        """The partial point a cut pull kept, if this pull can go on with it; else it is dropped."""
        try:
            kept = self.tx.partial_point()
        except DamagedFileError:
            kept = None
        if kept is None:
            self.tx.drop_partial()  # a damaged record, if any: its files go
            return None
        same = replace(kept, disk=0, block=0) == self._partial((0, 0))
        inside = replica.within(self.source.disks, (kept.disk, kept.block))
        if same and inside and self._files_whole(kept.point):
            return kept
        reason = "another point or base" if not same else "past the point's end" if not inside else "its files are gone"
        log.info("replica.partial_dropped", site=self.site.name, host=self.host.name, point=kept.point, reason=reason)
        self.tx.drop_partial()
        return None

    def _files_whole(self, point_id: str) -> bool:
        """Each disk's image and hash list of a partial point are there, the list as long as the disk."""
        for d in self.source.disks:
            image, hashes = self.tx.partial_files(point_id, d.slot)
            if not image.exists() or not hashes.exists():
                return False
            if hashes.stat().st_size != block_count(d.size, d.block_size) * HASH_LEN:
                return False
        return True

    def _partial(self, at: tuple[int, int]) -> chains.Partial:
        """This pull's point, written on this appliance's newest point (`self.base`) up to `at`."""
        base = self.base
        return chains.Partial(self.source.id, self.site.name, base["id"] if base else None,
                              dict(base["digests"]) if base else {}, *at)  # fmt: skip

    def _receive(self, records: protocol.RecordReader, stream: RemoteStream, receivers: list[DiskReceiver]) -> None:
        """Every disk from `self.at` on (the capture's own first pass), then the source's F record; a cut keeps
        what arrived (class doc)."""
        try:
            for index, (rx, disk) in enumerate(zip(receivers, self.source.disks, strict=True)):
                if index >= self.at[0]:
                    start = self.at[1] if index == self.at[0] else 0
                    self.at = (index, start)
                    records.start_disk(disk.size, disk.block_size, start)
                    self._first_pass(records, stream, rx)
                if rx.hashes.digest() != disk.digest:
                    raise ChainCorruptError(
                        f"{self.host.name} {disk.slot}: point {self.source.id} as received does not match the digest "
                        f"site {self.site.name} recorded for it; it was not recorded here (the next run fetches it "
                        "again)"
                    )
                if index >= self.at[0]:
                    self.at = (index + 1, 0)
                    self._keep(rx)
            if not isinstance(self._next(records, stream), Finished):
                raise violation(self.host, "a record after the last disk of a replicated point")
            for rx in receivers:
                rx.flush()
        except (ChainCorruptError, ProtocolViolationError):
            self.tx.drop_partial()  # what arrived cannot be trusted: the next pull starts afresh
            raise
        except (ApplianceError, OSError) as exc:
            self._keep_on_cut(receivers, exc)
            raise

    def _written(self, rx: DiskReceiver, record: DataRun | ZeroRun) -> None:
        """Every CHECKPOINT_BYTES of data, what arrived is kept."""
        count = record.count if isinstance(record, ZeroRun) else -(-len(record.data) // rx.plan.block_size)
        self.at = (self.at[0], record.first + count)
        self.unsynced += len(record.data) if isinstance(record, DataRun) else 0
        if self.unsynced >= CHECKPOINT_BYTES:
            self._keep(rx)

    def _keep(self, rx: DiskReceiver) -> None:
        """Record that every block before `self.at` is here (after checking and flushing them)."""
        rx.sync()
        self.tx.keep_partial(self.draft, self._partial(self.at))
        self.unsynced = 0
        checkpoint("replica.kept")

    def _keep_on_cut(self, receivers: list[DiskReceiver], cut: BaseException) -> None:
        """The pull was cut (not by bad data): keep what arrived up to the last record, if it checks out."""
        if self.at == (0, 0):
            return  # nothing arrived
        disk = min(self.at[0], len(receivers) - 1)
        try:
            self._keep(receivers[disk])
        except (ApplianceError, OSError) as exc:  # the blocks since the last checkpoint are fetched again
            log.warning("replica.keep_failed", site=self.site.name, host=self.host.name, error=str(exc))
            return
        log.info("replica.cut_kept", site=self.site.name, host=self.host.name, point=self.source.id, disk=self.at[0],
                 block=self.at[1], cut=str(cut))  # fmt: skip
        if isinstance(cut, ApplianceError):
            cut.hint = f"what arrived is kept: the next run goes on from disk {self.at[0]}, block {self.at[1]}"

    def _failure(self, failure: protocol.RemoteFailure) -> Exception:
        if failure.code in ("no-hashes", "no-point"):  # merged away meanwhile, or too old to send as an increment
            return _Skipped(failure.message)
        return RemoteCommandError(f"site {self.site.name} could not send {self.host.name}'s point {self.source.id}: "
                                  f"{failure.message}; it was not recorded here (the next run asks again)")  # fmt: skip

    def _hello(self, records: protocol.RecordReader, stream: RemoteStream) -> Hello:
        hello = self._next(records, stream, starting=True)
        if not isinstance(hello, Hello):
            raise violation(self.host, "a replicated point that does not start with its hello")
        sizes = [d.size for d in hello.disks]
        if sizes != [d.size for d in self.source.disks] or any(
            d.slot != slot_name(i) for i, d in enumerate(self.source.disks)
        ):
            raise violation(self.host, f"point {self.source.id} with other disks than its catalog lists")
        return hello
