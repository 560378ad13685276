# SPDX-License-Identifier: GPL-2.0-or-later
"""Value objects of the product's own words: protected host, disk, recovery point."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from appliance.domain.recovery import RESERVED_NAMES
from appliance.errors import ConfigError

HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
POINT_ID_FORMAT = "%Y%m%dT%H%M%SZ"

# Block size of content hashing and change detection. A write smaller than a block costs the whole block
# on the wire, so smaller is cheaper for scattered writes; but every block costs a 16-byte hash prefix sent
# to the host (zero blocks aside) and a per-block step in Python on both sides. Measured here (bench
# capture, 2 GiB disk, 40 % data, 1 % changed in 4 KiB..1 MiB extents; bytes on the wire over bytes that
# really changed): 64K 1.16x, 32K 1.09x, 16K 1.07x, at the same speed for 64K and 32K and 12 % slower at
# 16K. 32K is the knee. Overlays use qcow2 clusters of the same size, so a changed block fills whole
# clusters and QEMU never copies the rest of a cluster up from the backing file.
DEFAULT_BLOCK_SIZE = 32 * 1024


@dataclass(frozen=True, slots=True)
class HostKey:
    """A pinned SSH host key: the only key this host is ever accepted with."""

    key_type: str
    base64: str
    fingerprint: str  # OpenSSH style: SHA256:<base64 without padding>


@dataclass(frozen=True, slots=True)
class Host:
    """A protected host: how to reach it, what to read, what to run around the read."""

    name: str
    address: str
    user: str
    port: int
    key_file: str
    host_key: HostKey
    disks: tuple[str, ...]
    pre_hook: tuple[str, ...] = ()
    post_hook: tuple[str, ...] = ()
    python: str = "python3"
    block_size: int = DEFAULT_BLOCK_SIZE
    timeout: float = 60.0
    # Recovery VM defaults: what `failover` uses unless told otherwise.
    vm_memory_mib: int = 1024
    vm_cpus: int = 1
    vm_network: str = "user"
    vm_disk_bus: str = "virtio"
    boot_check: str = "screen"  # see domain.recovery.BootCheck
    verify_boot: bool = False  # boot-verify every new point after its backup
    vm_restart: bool = True  # the daemon restarts a recovery VM that was running when the appliance stopped
    # Limits on what the host may claim: a larger disk is refused; a job slower than min_rate overall ends.
    max_disk_size: int = 64 << 40
    min_rate: int = 1 << 20  # bytes per second, averaged over the whole job
    # A point is one moment of the disks where the host allows it (auto), or a plain live read (live);
    # a freeze of the host's file systems never lasts longer than freeze_limit seconds.
    consistency: str = "auto"
    freeze_limit: float = 10.0
    # Schedule and retention (see domain.retention): 0 means "not set".
    interval: float = 0.0  # seconds between scheduled backups
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    # A host whose points come from another appliance (`replicate SITE`): the site's name. Such a host is
    # never backed up here; its points fail over and boot as any other.
    replica_of: str = ""

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}" + ("" if self.port == 22 else f":{self.port}")


@dataclass(frozen=True, slots=True)
class Site:
    """Another appliance this one pulls points from (the DR site's view of the source site): how to reach
    its `serve-replica` forced command, with its pinned key."""

    name: str
    address: str
    user: str
    port: int
    key_file: str  # relative to APPLIANCE_HOME
    host_key: HostKey
    timeout: float = 60.0
    bandwidth: int = 0  # bytes a second a replication may take of the link; 0: no limit
    window: str = ""  # HH:MM-HH:MM local time when the daemon may start points ("": any time)
    interval: float = 0.0  # seconds between the daemon's replications; 0: not scheduled

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}" + ("" if self.port == 22 else f":{self.port}")

    def endpoint(self) -> Host:
        """The site as an SSH endpoint (the connection code takes hosts)."""
        return Host(name=self.name, address=self.address, user=self.user, port=self.port, key_file=self.key_file,
                    host_key=self.host_key, disks=(), timeout=self.timeout)  # fmt: skip


CONSISTENCY_MODES = ("auto", "lvm-snapshot", "live")


def validate_consistency(mode: str) -> str:
    if mode not in CONSISTENCY_MODES:
        raise ConfigError(
            f"invalid consistency {mode!r}: use auto (one moment where the host allows it), lvm-snapshot or live"
        )
    return mode


def validate_freeze_limit(seconds: float) -> float:
    if not 0.5 <= seconds <= 600:
        raise ConfigError(f"invalid freeze limit {seconds:g}: use 0.5 to 600 seconds")
    return seconds


def validate_host_name(name: str) -> str:
    """Every name a command is given: it becomes file names under APPLIANCE_HOME, so it is never a path."""
    if not HOST_NAME.match(name):
        raise ConfigError(
            f"invalid host name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def validate_new_host_name(name: str) -> str:
    """A host being added: a valid name that is none of the words the CLI takes in a host name's place."""
    if validate_host_name(name) in RESERVED_NAMES:
        raise ConfigError(
            f"{name!r} cannot name a host: `appliance failover {name}` and `appliance failback {name}` are commands"
        )
    return name


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'15m', '1h', '30s', '1d' -> seconds."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"invalid interval {text!r}: use e.g. 30s, 15m, 1h, 1d")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _SECONDS[unit] and seconds % _SECONDS[unit] == 0:
            return f"{int(seconds // _SECONDS[unit])}{unit}"
    return f"{seconds:g}s"


def format_size(n: float) -> str:
    """Bytes as people read them: '512 B', '1.5 GiB' (binary units, as qemu-img and the options use)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_age(seconds: float) -> str:
    """A rough duration for a person: 45 s, 12 min, 3 h 5 min, 2 d 4 h."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min" if s % 3600 >= 60 else f"{s // 3600} h"
    return f"{s // 86400} d {s % 86400 // 3600} h" if s % 86400 >= 3600 else f"{s // 86400} d"


def validate_block_size(size: int) -> int:
    if size < 4096 or size > (1 << 20) or size & (size - 1):
        raise ConfigError(f"invalid block size {size}: use a power of two from 4K to 1M")
    return size


def parse_address(address: str, port: int | None) -> tuple[str, str, int]:
    """Split `user@host[:port]` into its parts; the user defaults to root, as for a backup agent."""
    user, _, rest = address.rpartition("@")
    user = user or "root"
    host, parsed_port = rest, None
    if rest.startswith("["):  # [v6]:port
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            parsed_port = tail[1:]
    elif rest.count(":") == 1:
        host, parsed_port = rest.split(":")
    if not host or not re.match(r"^[A-Za-z0-9._:-]+$", host) or not re.match(r"^[A-Za-z0-9._-]+$", user):
        raise ConfigError(f"invalid address {address!r}: expected user@host or user@host:port")
    try:
        final_port = port if port is not None else int(parsed_port) if parsed_port else 22
    except ValueError:
        raise ConfigError(f"invalid port in {address!r}") from None
    if not 1 <= final_port <= 65535:
        raise ConfigError(f"invalid port {final_port}: must be 1..65535")
    return user, host, final_port


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of the last integrity check of a point."""

    time: datetime
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Consistency:
    """What a point is: one moment of its disks, and how the host proved it, or a live read.

    `frozen`: every file system on the disks was frozen (FIFREEZE) at that moment, so each is clean, as
    after a shutdown. `moment`: one moment of the disks, proven by tracing their writes, with nothing
    (or not everything) to freeze: as after a power cut, the journals replay. `lvm-snapshot`: read from
    an LVM snapshot. `live`: the disks were read while they were written; what was missing is `detail`.
    """

    kind: str
    seconds: float = 0.0  # how long the file systems stayed frozen
    detail: str = ""
    passes: int = 0  # passes over written blocks after the first, full one

    @property
    def consistent(self) -> bool:
        return self.kind != "live"

    @property
    def label(self) -> str:
        if self.kind == "frozen":
            return f"frozen {self.seconds:.2f} s"
        if self.kind == "moment":
            return "one moment (crash-consistent)"
        if self.kind == "live":
            return "live (not consistent)"
        return self.kind


@dataclass(frozen=True, slots=True)
class DiskPoint:
    """One disk of one recovery point: a qcow2 file whose backing file is the previous point's."""

    slot: str  # disk0, disk1, ... in the order the host's disks were given
    source: str  # the path read on the host
    file: str  # relative to the host's store folder
    size: int  # exact byte size of the source disk
    block_size: int
    digest: str  # sha256 over the sha256 of every block, computed on the host during the read
    read_bytes: int = 0
    changed_bytes: int = 0  # bytes of blocks that differ from the previous point (zeroed ones included)
    sent_bytes: int = 0  # block data that crossed the wire


@dataclass(frozen=True, slots=True)
class Point:
    """A recovery point: every disk of a host at one moment, visible only once complete."""

    id: str
    created: datetime
    seconds: float
    disks: tuple[DiskPoint, ...]
    wire_bytes: int = 0  # everything that crossed the connection, both ways, framing and hashes included
    verification: Verification | None = None
    extra: dict[str, object] = field(default_factory=dict)
    consistency: Consistency | None = None  # None: a point from before the appliance recorded it, or imported
    dropping: bool = False  # consolidation is merging it away: it no longer reads as itself

    @property
    def time_iso(self) -> str:
        return self.created.strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def changed_bytes(self) -> int:
        return sum(d.changed_bytes for d in self.disks)

    @property
    def sent_bytes(self) -> int:
        return sum(d.sent_bytes for d in self.disks)

    def disk(self, slot: str) -> DiskPoint:
        for d in self.disks:
            if d.slot == slot:
                return d
        raise KeyError(slot)

    def verified(self, result: Verification) -> Point:
        return replace(self, verification=result)


def point_id_for(moment: datetime, taken: set[str]) -> str:
    """A sortable id from the capture time, unique within the chain."""
    base = moment.astimezone(UTC).strftime(POINT_ID_FORMAT)
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def slot_name(index: int) -> str:
    return f"disk{index}"
