# SPDX-License-Identifier: GPL-2.0-or-later
"""The replication wire format: a DR appliance pulls points from a source appliance over SSH.

The source runs `appliance serve-replica` as the forced command of the key it granted the DR site
(`site grant`): the DR site can ask only what this format has words for, and names hosts and points,
never paths. Requests (DR -> source) are u32 length + JSON:

  {"op": "catalog"}                      -> C u32+JSON {"protocol", "hosts": [{"name", "settings",
                                            "points": [point as in chain.json]}]}
  {"op": "point", "host", "point",       -> the reader's own records (agent/reader.py): H (hello, with
   "base": {"id", "digests": {slot:      "base_known"), then per disk its changed blocks as D and Z
   digest}} | null}                         records and its E record (the point's digest), then F.
                                            Unless the source holds the DR's newest point (`base`,
                                            same digests: "base_known"), the DR sends the hashes of
                                            what it holds, per disk, as a capture sends them to a host.
  {"op": "confirm", "held": {host:       -> nothing: the source keeps each such point from being merged
   {"id", "digests"}}}                      away (and the hash lists from there on) for this DR site
Either side's failure: X u32+JSON {"code", "message"}; nothing after it. One request after another
on one session, until the DR closes it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.domain.models import HOST_NAME, Point
from appliance.errors import DamagedFileError
from appliance.store.catalog import check_point_names, point_doc
from appliance.store.files import as_type
from appliance.transfer.protocol import MAX_MESSAGE, ProtocolError, printable

PROTOCOL = 1
MAX_REQUEST = 1 << 16
MAX_CATALOG = 64 << 20  # ~200 bytes a point and disk: hundreds of thousands of points
_U32 = struct.Struct("<I")
# What a DR site needs of a host to run its points: its disks and its recovery VM's shape, nothing else
# (no address, key, hooks or schedule: those are the source site's business).
SETTINGS = ("disks", "block_size", "vm_memory_mib", "vm_cpus", "vm_network", "vm_disk_bus", "boot_check")


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
