# SPDX-License-Identifier: GPL-2.0-or-later
"""The replication wire format: a DR appliance pulls points from a source appliance over SSH.

The source runs `appliance serve-replica` as the forced command of the key it granted the DR site
(`site grant`): the DR site can ask only what this format has words for, and names hosts and points,
never paths. Requests (DR -> source) are u32 length + JSON:

  {"op": "catalog"}                      -> C u32+JSON {"protocol", "hosts": [{"name", "settings",
                                            "points": [point as in chain.json]}]}
  {"op": "point", "host", "point",       -> the reader's own records (agent/wire.py): H (hello, with
   "base": {"id", "digests": {slot:      "base_known"), then per disk its changed blocks as D and Z
   digest}} | null,                         records and its E record (the point's digest), then F.
   "compress": "zstd"}                      Unless the source holds the DR's newest point (`base`,
                                            same digests: "base_known"), the DR sends the hashes of
                                            what it holds, per disk, as a capture sends them to a host.
                                            With "compress": "zstd", a D record whose data zstd shrinks
                                            to at most 90 % may come as a K record instead:
                                              K u64 block, u32 length, u32 compressed length, then the
                                              32-byte hash of each block, then one zstd frame of exactly
                                              `length` bytes (protocol.unpack_data)
                                            A source that does not know "compress" ignores it and sends
                                            D records: old and new appliances replicate with each other.
  {"op": "confirm", "held": {host:       -> nothing: the source keeps each such point from being merged
   {"id", "digests"}}}                      away (and the hash lists from there on) for this DR site
Either side's failure: X u32+JSON {"code", "message"}; nothing after it. One request after another
on one session, until the DR closes it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.agent import wire
from appliance.domain.blocks import block_count
from appliance.domain.models import HOST_NAME, DiskPoint, Host, Point
from appliance.errors import DamagedFileError
from appliance.store.catalog import check_point_names, point_doc
from appliance.store.files import as_type
from appliance.transfer.protocol import COMPRESSED, MAX_MESSAGE, ZSTD_WINDOW_LOG, ProtocolError, printable, zstd

PROTOCOL = 1
MAX_REQUEST = 1 << 16
MAX_CATALOG = 64 << 20  # ~200 bytes a point and disk: hundreds of thousands of points
_U32 = struct.Struct("<I")
# What a DR site needs of a host to run its points: its disks and its recovery VM's shape, nothing else
# (no address, key, hooks or schedule: those are the source site's business).
SETTINGS = ("disks", "block_size", "vm_memory_mib", "vm_cpus", "vm_network", "vm_disk_bus", "boot_check")


def settings_of(host: Host) -> dict[str, Any]:
    """The host's SETTINGS, as a DR site, a seed export and a cloud manifest carry them."""
    return {k: v for k, v in dataclasses.asdict(host).items() if k in SETTINGS}


def with_settings(host: Host, settings: dict[str, Any]) -> Host:
    """`host` with the settings another appliance recorded (a value of another type than the field's is
    left out: a newer appliance's record cannot break this one's)."""
    kept: dict[str, Any] = {k: v for k, v in settings.items()
                            if k != "disks" and type(v) is type(getattr(host, k, None))}  # fmt: skip
    return dataclasses.replace(host, **kept)


# A record is sent compressed only when zstd shrinks it to 90 % or less: below that, the DR site's time to
# decompress and the K header are not worth it. Level 3 (zstd's default) compresses text and binaries
# at ~200 MiB/s on one core here, above what a 1 Gbit/s link carries (README, "Replication").
COMPRESS = "zstd"
COMPRESS_LEVEL = 3
PAYS = 0.9
# Before a record is compressed whole, a sample of it is: a piece of 1 KiB of every 8 KiB, spread over it,
# at most 16. Random or already-compressed data (which zstd cannot shrink) then costs ~20 us a MiB in
# records of 1 MiB instead of ~300, and ~200 us instead of ~800 in records of one 32 KiB block (README).
# The sample must shrink to 95 %: small pieces shrink less than the whole record does.
_SAMPLE_EVERY, _SAMPLE_PIECE, _SAMPLE_PIECES, _SAMPLE_PAYS = 8192, 1024, 16, 0.95


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return _U32.pack(len(body)) + body


def record(tag: bytes, obj: dict[str, Any]) -> bytes:
    return tag + encode(obj)


def read_request(read: Callable[[int], bytes]) -> dict[str, Any] | None:
    """The next request (None: the DR closed the session). :raises ProtocolError: not one."""
    head = read(_U32.size)
    if not head:
        return None
    if len(head) != _U32.size:
        raise ProtocolError("a request cut short")
    (length,) = _U32.unpack(head)
    if length > MAX_REQUEST:
        raise ProtocolError(f"a request of {length} bytes (at most {MAX_REQUEST})")
    body = read(length)
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise ProtocolError("a request that is not JSON") from exc
    if len(body) != length or not isinstance(obj, dict):
        raise ProtocolError("a request that is not a JSON object")
    return obj


@dataclass(frozen=True, slots=True)
class SourceHost:
    """A host as the source site lists it: its settings for running its points, and its points."""

    name: str
    settings: dict[str, Any]
    points: tuple[Point, ...]


def point_ref(point: Point) -> dict[str, Any]:
    """A point as the other site names it: its id and each disk's digest (same id, same content)."""
    return {"id": point.id, "digests": {d.slot: d.digest for d in point.disks}}


def within(disks: Sequence[DiskPoint], at: tuple[int, int]) -> bool:
    """Whether (disk, block) is a place in a point's disks a pull may go on from: a block of a disk (or the
    end of one), or the end of the last."""
    disk, block = at
    if disk == len(disks):
        return block == 0
    return 0 <= disk < len(disks) and 0 <= block <= block_count(disks[disk].size, disks[disk].block_size)


def origin(kind: str, site: str, source: Point) -> dict[str, object]:
    """The `extra` of a point that came from another site (`kind`: "replica of", "seed from"), naming where
    the source had it from in turn."""
    was = f" ({source.extra['origin']})" if source.extra.get("origin") else ""
    return {"origin": f"{kind} {site}{was}", "site": site}


def catalog_doc(hosts: Sequence[tuple[str, dict[str, Any], Sequence[Point]]]) -> dict[str, Any]:
    return {
        "protocol": PROTOCOL,
        "hosts": [{"name": n, "settings": s, "points": [point_doc(p) for p in pts]} for n, s, pts in hosts],
    }


def parse_catalog(obj: Any, site: str) -> list[SourceHost]:
    """:raises ProtocolError: not a catalog this appliance serves (names are checked: they become paths)."""
    if not isinstance(obj, dict) or obj.get("protocol") != PROTOCOL or not isinstance(obj.get("hosts"), list):
        raise ProtocolError(f"a catalog of another protocol than {PROTOCOL}")
    where = Path(f"<catalog of site {site}>")
    out = []
    for entry in obj["hosts"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not HOST_NAME.match(entry["name"]):
            raise ProtocolError(f"a catalog naming a host {printable(str(entry)[:60], 60)!r}")
        settings = entry.get("settings")
        if not isinstance(settings, dict):
            raise ProtocolError(f"a catalog without the settings of {entry['name']}")
        try:
            points = tuple(as_type(p, Point, where, entry["name"]) for p in entry.get("points") or [])
            for point in points:
                check_point_names(where, point)
        except DamagedFileError as exc:
            raise ProtocolError(printable(exc.message, MAX_MESSAGE)) from exc
        out.append(SourceHost(entry["name"], {k: settings[k] for k in SETTINGS if k in settings}, points))
    return out


def read_catalog(read_exact: Callable[[int], memoryview], site: str) -> list[SourceHost]:
    """The answer to a catalog request. :raises ProtocolError: anything else; RemoteRefusal: the source's X."""
    tag = bytes(read_exact(1))
    (length,) = _U32.unpack(read_exact(_U32.size))
    if tag not in (b"C", b"X") or length > (MAX_CATALOG if tag == b"C" else MAX_REQUEST):
        raise ProtocolError(f"a {printable(tag.decode('latin-1'), 4)!r} record of {length} bytes for the catalog")
    try:
        obj = json.loads(bytes(read_exact(length)))
    except ValueError as exc:
        raise ProtocolError("a catalog that is not JSON") from exc
    if tag == b"X":
        said = obj if isinstance(obj, dict) else {}
        code, message = str(said.get("code", "")), str(said.get("message", ""))
        raise RemoteRefusal(printable(code, 40), printable(message, MAX_MESSAGE))
    return parse_catalog(obj, site)


class RemoteRefusal(Exception):
    """The source appliance refused a request (its X record)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DataPacker:
    """The source's data records for a DR site that asked for "compress": a K record where zstd pays (at
    most PAYS of the raw bytes), the reader's plain D record otherwise. Counts what it was given and what
    it returned, for the source's log."""

    def __init__(self, level: int = COMPRESS_LEVEL) -> None:
        # The window never exceeds a record's size: the DR site refuses frames that need more.
        self._zstd = zstd.ZstdCompressor(options={
            zstd.CompressionParameter.compression_level: level, zstd.CompressionParameter.window_log: ZSTD_WINDOW_LOG,
        })  # fmt: skip
        self.raw = 0
        self.sent = 0

    def record(self, first: int, length: int, hashes: bytes, data: bytes) -> tuple[bytes, bytes]:
        """(header and hashes, payload) of the record of blocks from `first`: `length` bytes of `data`."""
        self.raw += length
        if self._worth_trying(data):
            packed = self._zstd.compress(data, mode=zstd.ZstdCompressor.FLUSH_FRAME)
            if len(packed) <= PAYS * length:
                self.sent += len(packed)
                return COMPRESSED.pack(b"K", first, length, len(packed)) + hashes, packed
        self.sent += length
        return wire.DATA.pack(b"D", first, length) + hashes, data

    def _worth_trying(self, data: bytes) -> bool:
        """Whether a sample of `data` shrinks (a record under 16 KiB is its own sample)."""
        pieces = min(len(data) // _SAMPLE_EVERY, _SAMPLE_PIECES)
        if pieces < 2:
            return True
        step, view = len(data) // pieces, memoryview(data)
        sample = b"".join(view[i * step : i * step + _SAMPLE_PIECE] for i in range(pieces))
        return len(self._zstd.compress(sample, mode=zstd.ZstdCompressor.FLUSH_FRAME)) <= _SAMPLE_PAYS * len(sample)
