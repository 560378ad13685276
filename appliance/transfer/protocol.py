# SPDX-License-Identifier: GPL-2.0-or-later
"""The appliance's side of the reader's wire format (defined in `appliance.agent.reader`).

Pure byte-stream code: it knows nothing of SSH, only of a `recv(n)` that returns up to n bytes and
of iterables of bytes to send.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.agent import reader as wire
from appliance.domain.blocks import HASH_LEN, Carry, OldBlock, block_length, zero_hash

_U64 = struct.Struct("<Q")
_RUN_HEADER = struct.Struct("<QI")


class ProtocolError(Exception):
    """The host sent something that is not the reader's wire format."""


@dataclass(frozen=True, slots=True)
class RemoteDisk:
    path: str
    size: int
    kind: str
    error: str = ""  # set only in a probe's answer, for a disk that cannot be read


@dataclass(frozen=True, slots=True)
class Hello:
    python: str
    disks: tuple[RemoteDisk, ...]


@dataclass(frozen=True, slots=True)
class DataRun:
    first: int
    hashes: bytes
    data: memoryview  # valid until the next record is read


@dataclass(frozen=True, slots=True)
class ZeroRun:
    first: int
    count: int


@dataclass(frozen=True, slots=True)
class Progress:
    read: int


@dataclass(frozen=True, slots=True)
class DiskEnd:
    read: int
    digest: str


@dataclass(frozen=True, slots=True)
class Finished:
    post_hook: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RemoteFailure:
    code: str
    message: str
    detail: dict[str, Any]


Record = Hello | DataRun | ZeroRun | Progress | DiskEnd | Finished | RemoteFailure


def encode_request(
    disks: Sequence[tuple[str, int]],
    pre_hook: Sequence[str] = (),
    post_hook: Sequence[str] = (),
    *,
    probe: bool = False,
) -> bytes:
    body = json.dumps(
        {
            "disks": [{"path": path, "block_size": bs} for path, bs in disks],
            "pre_hook": list(pre_hook),
            "post_hook": list(post_hook),
            "probe": probe,
        }
    ).encode()
    return wire.U32.pack(len(body)) + body


def encode_old_hashes(previous: Iterable[bytes], carry: Carry, old_size: int, block_size: int) -> Iterator[bytes]:
    """The previous point's hash list as the reader wants it: runs of ZERO, HASH (16-byte prefixes), UNKNOWN.

    `previous` yields the previous point's hash list in order (32 bytes a block), in chunks of any size.
    """
    runs = _RunEncoder()
    index = 0
    for chunk in previous:
        for off in range(0, len(chunk), HASH_LEN):
            if index >= carry.known:
                break
            h = chunk[off : off + HASH_LEN]
            if h == zero_hash(block_length(index, old_size, block_size)):
                yield from runs.add(OldBlock.ZERO)
            else:
                yield from runs.add(OldBlock.HASH, h[: wire.PREFIX_LEN])
            index += 1
    if index < carry.known:
        raise ProtocolError(f"previous hash list has {index} blocks, expected {carry.known}")
    for i in range(carry.known, carry.total):
        yield from runs.add(OldBlock.UNKNOWN if i in carry.unknown else OldBlock.ZERO)
    yield from runs.flush()


class _RunEncoder:
    def __init__(self) -> None:
        self.kind: OldBlock | None = None
        self.count = 0
        self.prefixes: list[bytes] = []

    def add(self, kind: OldBlock, prefix: bytes = b"") -> Iterator[bytes]:
        if kind != self.kind or self.count >= 65536:
            yield from self.flush()
            self.kind = kind
        self.count += 1
        if prefix:
            self.prefixes.append(prefix)

    def flush(self) -> Iterator[bytes]:
        if self.kind is not None and self.count:
            yield wire.RUN.pack(int(self.kind), self.count) + b"".join(self.prefixes)
        self.kind, self.count, self.prefixes = None, 0, []


class RecordReader:
    """Decodes the reader's records from `recv_some`, which returns whatever bytes have arrived (b'' at end).

    Block data is handed out as a memoryview into the received chunk when a record lies in one chunk,
    so most bytes are copied once (by the transport) on their way to the disk.
    """

    def __init__(self, recv_some: Callable[[], bytes]) -> None:
        self._recv_some = recv_some
        self._chunk = b""
        self._pos = 0
        self.block_size = 0  # of the disk being received; the caller sets it before each disk

    def read_exact(self, n: int) -> memoryview:
        available = len(self._chunk) - self._pos
        if available >= n:
            view = memoryview(self._chunk)[self._pos : self._pos + n]
            self._pos += n
            return view
        parts = [memoryview(self._chunk)[self._pos :]]
        have = available
        while have < n:
            chunk = self._recv_some()
            if not chunk:
                raise EOFError("stream ended")
            parts.append(memoryview(chunk))
            have += len(chunk)
        joined = b"".join(parts)
        self._chunk, self._pos = joined, n
        return memoryview(joined)[:n]

    def _json(self) -> dict[str, Any]:
        (length,) = wire.U32.unpack(self.read_exact(wire.U32.size))
        try:
            return dict(json.loads(bytes(self.read_exact(length))))
        except ValueError as exc:
            raise ProtocolError(f"bad JSON record: {exc}") from exc

    def next(self) -> Record:
        tag = bytes(self.read_exact(1))
        if tag == b"D":
            first, length = _RUN_HEADER.unpack(self.read_exact(_RUN_HEADER.size))
            count = -(-length // self.block_size)
            hashes = self.read_exact(count * HASH_LEN)
            return DataRun(first, bytes(hashes), self.read_exact(length))
        if tag == b"Z":
            first, count = _RUN_HEADER.unpack(self.read_exact(_RUN_HEADER.size))
            return ZeroRun(first, count)
        if tag == b"P":
            return Progress(_U64.unpack(self.read_exact(_U64.size))[0])
        if tag == b"E":
            (read,) = _U64.unpack(self.read_exact(_U64.size))
            return DiskEnd(read, bytes(self.read_exact(HASH_LEN)).hex())
        if tag == b"H":
            obj = self._json()
            disks = tuple(RemoteDisk(d["path"], int(d["size"]), d["kind"], d.get("error", "")) for d in obj["disks"])
            return Hello(str(obj.get("python", "?")), disks)
        if tag == b"F":
            return Finished(self._json().get("post_hook"))
        if tag == b"X":
            obj = self._json()
            return RemoteFailure(str(obj.pop("code", "error")), str(obj.pop("message", "")), obj)
        raise ProtocolError(f"unexpected record type {tag!r}")
