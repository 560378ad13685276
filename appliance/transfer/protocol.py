# SPDX-License-Identifier: GPL-2.0-or-later
"""The appliance's side of the reader's wire format (defined in `appliance.agent.wire`).

Pure byte-stream code: it knows nothing of SSH, only of a `recv(n)` that returns up to n bytes and
of iterables of bytes to send.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.agent import wire
from appliance.domain.blocks import HASH_LEN, Carry, OldBlock, block_count, block_length, zero_hash

# zstd, for replication's compressed records (here and in transfer/replica.py): the standard library's from
# Python 3.14 on, its backport before.
if sys.version_info >= (3, 14):
    from compression import zstd as zstd
else:
    from backports import zstd as zstd

_U64 = struct.Struct("<Q")
_RUN_HEADER = struct.Struct("<QI")
# Replication only (transfer/replica.py): K u64 block, u32 length, u32 compressed length, then the 32-byte
# hash of each block, then one zstd frame that decompresses to exactly `length` bytes: a D record's data.
COMPRESSED = struct.Struct("<cQII")
_COMPRESSED_HEADER = struct.Struct("<QII")
# A frame's window need not exceed the largest record it carries (MAX_RUN bytes): a frame that asks the
# decompressor for a larger window is refused before the decompressor allocates it.
ZSTD_WINDOW_LOG = (wire.MAX_RUN - 1).bit_length()

# The reader's JSON records are small: a hello names each disk asked for, a failure carries a message, a
# post hook report at most 2000 characters of output. A larger one is not the reader's.
MAX_JSON_RECORD = 1 << 20
MAX_MESSAGE = 500  # characters of the host's own text (an error message) shown to the user


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
    consistency: tuple[str, str] | None = None  # a probe's answer: (method, why) points will get
    tracked: bool = False  # this point reads only the blocks written since the last one: no first pass
    untracked: str = ""  # why not, when the appliance asked for it
    base_known: bool = False  # a source appliance holds the DR site's newest point: no hashes to send it


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
class Repass:
    """The D and Z records that follow are blocks of disk `disk` read again (written since they were read)."""

    disk: int


@dataclass(frozen=True, slots=True)
class Moment:
    """What the reader made of the point: `kind` is frozen, moment, lvm-snapshot or live (see
    domain.models.Consistency)."""

    kind: str
    seconds: float
    passes: int
    reread: tuple[int, ...]  # bytes read again on the host after the first pass, per disk
    detail: str
    token: str = ""  # a reader that stays: names this point as the base of the next, tracked one
    timings: dict[str, float] | None = None  # seconds per phase on the host (first pass, passes, sync, freeze)
    snapshots: tuple[str, ...] = ()  # lvm-snapshot: each snapshot's kind and how full it got during the read


@dataclass(frozen=True, slots=True)
class Finished:
    post_hook: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RemoteFailure:
    code: str
    message: str
    detail: dict[str, Any]


Record = Hello | DataRun | ZeroRun | Progress | DiskEnd | Repass | Moment | Finished | RemoteFailure

MOMENT_KINDS = ("frozen", "moment", "lvm-snapshot", "live")


def encode_request(
    disks: Sequence[tuple[str, int]],
    pre_hook: Sequence[str] = (),
    post_hook: Sequence[str] = (),
    *,
    probe: bool = False,
    consistency: str = "auto",
    freeze_limit: float = 10.0,
    pause_frozen: float = 0.0,
    resident: bool = False,
    track_from: str | None = None,
) -> bytes:
    body = json.dumps(
        {
            "disks": [{"path": path, "block_size": bs} for path, bs in disks],
            "pre_hook": list(pre_hook),
            "post_hook": list(post_hook),
            "probe": probe,
            "consistency": consistency,
            "freeze_limit": freeze_limit,
            "resident": resident,
            "track_from": track_from,
            **({"pause_frozen": pause_frozen} if pause_frozen else {}),
        }
    ).encode()
    return wire.U32.pack(len(body)) + body


def encode_old_hashes(
    previous: Iterable[bytes], carry: Carry, old_size: int, block_size: int, start: int = 0
) -> Iterator[bytes]:
    """The previous point's hash list as the reader wants it: runs of ZERO, HASH (16-byte prefixes), UNKNOWN,
    from block `start` on (a resumed replication asks only for the blocks from where it was cut).

    `previous` yields the previous point's hash list in order (32 bytes a block), in chunks of any size.
    """
    runs = _RunEncoder()
    index = 0
    for chunk in previous:
        for off in range(0, len(chunk), HASH_LEN):
            if index >= carry.known:
                break
            if index >= start:
                h = chunk[off : off + HASH_LEN]
                if h == zero_hash(block_length(index, old_size, block_size)):
                    yield from runs.add(OldBlock.ZERO)
                else:
                    yield from runs.add(OldBlock.HASH, h[: wire.PREFIX_LEN])
            index += 1
    if index < carry.known:
        raise ProtocolError(f"previous hash list has {index} blocks, expected {carry.known}")
    for i in range(max(carry.known, start), carry.total):
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

    The host is not trusted: every length is checked against what the reader can send before a byte of
    it is read (a record claiming 4 GiB is refused at its header, it never makes the appliance wait for
    or buffer 4 GiB), and every D, Z, P and E record against the disk being received (`start_disk`).
    Anything else raises ProtocolError.

    Block data is handed out as a memoryview into the received chunk when a record lies in one chunk,
    so most bytes are copied once (by the transport) on their way to the disk.

    K records (a D record's data compressed, `unpack_data`) are a replication source's, and are refused
    unless `accept_compressed` said they were asked for: a host's reader never sends them.
    """

    def __init__(self, recv_some: Callable[[], bytes]) -> None:
        self._recv_some = recv_some
        self._compressed = False
        self._chunk = b""
        self._pos = 0
        self._disk: _DiskCursor | None = None
        self._disks: list[tuple[int, int]] = []
        self._repassing = False
        self._moment_seen = False

    def start_disk(self, size: int, block_size: int, from_block: int = 0) -> None:
        """The records that follow, up to its E record, are the first pass over the next disk, of `size` bytes
        in blocks of `block_size`, from block `from_block` on (a resumed replication: the blocks before it
        are here already). Later passes (R records) may name any disk started so far."""
        if self._repassing:
            raise ProtocolError("a disk's first pass after a later pass")
        self._disk = _DiskCursor(size, block_size)
        self._disk.next_block = from_block
        self._disks.append((size, block_size))

    def accept_compressed(self) -> None:
        """The peer was asked for compressed data (a replication point request's "compress"): K records
        are accepted from now on, as D records are."""
        self._compressed = True

    def add_disk(self, size: int, block_size: int) -> None:
        """A disk with no first pass (a tracked point): only later passes, R records, name it."""
        self._disks.append((size, block_size))

    def read_exact(self, n: int) -> memoryview:
        """The next `n` bytes, gathered in memory: the caller bounds `n` by what the peer may send first."""
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

    def next(self) -> Record:
        tag = bytes(self.read_exact(1))
        if tag == b"D":
            return self._data()
        if tag == b"K" and self._compressed:
            return self._compressed_data()
        if tag == b"Z":
            first, count = _RUN_HEADER.unpack(self.read_exact(_RUN_HEADER.size))
            self._cursor("zero").zero(first, count)
            return ZeroRun(first, count)
        if tag == b"P":
            (read,) = _U64.unpack(self.read_exact(_U64.size))
            self._cursor("progress").progress(read)
            return Progress(read)
        if tag == b"E":
            (read,) = _U64.unpack(self.read_exact(_U64.size))
            self._cursor("end-of-disk").end(read)
            self._disk = None
            return DiskEnd(read, bytes(self.read_exact(HASH_LEN)).hex())
        if tag == b"R":
            return self._repass()
        if tag == b"M":
            return self._moment()
        if tag == b"H":
            return _hello(self._json("hello"))
        if tag == b"F":
            return _finished(self._json("finished"))
        if tag == b"X":
            obj = self._json("failure")
            code, message = obj.pop("code", "error"), obj.pop("message", "")
            return RemoteFailure(printable(str(code), 40), printable(str(message), MAX_MESSAGE), obj)
        raise ProtocolError(f"a record of unknown type {printable(tag.decode('latin-1'), 4)!r}")

    def _repass(self) -> Repass:
        (disk,) = wire.U32.unpack(self.read_exact(wire.U32.size))
        if self._disk is not None and not self._repassing:
            raise ProtocolError("a later pass in the middle of a disk's first pass")
        if self._moment_seen:
            raise ProtocolError("a later pass after the moment record")
        if disk >= len(self._disks):
            raise ProtocolError(f"a later pass over disk {disk} (there are {len(self._disks)})")
        size, block_size = self._disks[disk]
        self._disk = _DiskCursor(size, block_size, first_pass=False)
        self._repassing = True
        return Repass(disk)

    def _moment(self) -> Moment:
        if self._disk is not None and not self._repassing:
            raise ProtocolError("a moment record in the middle of a disk's first pass")
        self._disk = None
        self._moment_seen = True
        return _moment(self._json("moment"), len(self._disks))

    def _data(self) -> DataRun:
        first, length = _RUN_HEADER.unpack(self.read_exact(_RUN_HEADER.size))
        count = self._cursor("data").data(first, length)
        hashes = bytes(self.read_exact(count * HASH_LEN))
        return DataRun(first, hashes, self.read_exact(length))

    def _compressed_data(self) -> DataRun:
        """A K record: checked as a D record of its decompressed length, whose bytes are then proven by the
        same per-block hashes; the compressed bytes are read only once the header is known to be bounded."""
        first, length, packed = _COMPRESSED_HEADER.unpack(self.read_exact(_COMPRESSED_HEADER.size))
        if not 0 < length <= wire.MAX_RUN or not 0 < packed < length:
            raise ProtocolError(f"a compressed data record of {packed} bytes for {length} (at most {wire.MAX_RUN})")
        count = self._cursor("data").data(first, length)
        hashes = bytes(self.read_exact(count * HASH_LEN))
        return DataRun(first, hashes, memoryview(unpack_data(self.read_exact(packed), length)))

    def _cursor(self, what: str) -> _DiskCursor:
        if self._disk is None:
            raise ProtocolError(f"a {what} record outside a disk")
        return self._disk

    def _json(self, what: str) -> dict[str, Any]:
        (length,) = wire.U32.unpack(self.read_exact(wire.U32.size))
        if length > MAX_JSON_RECORD:
            raise ProtocolError(f"a {what} record of {length} bytes (the reader's are at most {MAX_JSON_RECORD})")
        try:
            obj = json.loads(bytes(self.read_exact(length)))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ProtocolError(f"a {what} record that is not JSON: {printable(str(exc), 80)}") from exc
        if not isinstance(obj, dict):
            raise ProtocolError(f"a {what} record that is not a JSON object")
        return obj


def unpack_data(packed: bytes | memoryview, length: int) -> bytes:
    """A K record's data: one zstd frame that decompresses to exactly `length` bytes and is followed by
    nothing. The peer is not trusted: at most `length` bytes (bounded by the caller) are ever produced,
    whatever the frame claims, and a window larger than a record's is refused before it is allocated.

    :raises ProtocolError: anything else (not zstd, damaged, shorter, longer, trailing bytes).
    """
    unpacker = zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG})
    try:
        data = unpacker.decompress(packed, max_length=length)
    except zstd.ZstdError as exc:
        raise ProtocolError(f"a compressed data record that does not decompress: {printable(str(exc), 80)}") from exc
    if len(data) != length or not unpacker.eof:  # shorter, cut short, or more to come past `length`
        raise ProtocolError(f"a compressed data record whose frame does not end at its {length} bytes")
    if unpacker.unused_data:
        raise ProtocolError("a compressed data record with bytes after its frame")
    return data


class _DiskCursor:
    """Where the reader is in one disk: what a D, Z, P or E record may claim next.

    The reader walks the disk once, front to back, and sends each changed run once: D and Z records come
    in increasing block order and never overlap (a run of data and a run of zeroes are each closed
    before the next one starts), each inside the disk; only the disk's last block may be short; P counts
    bytes read so far, more each time; E comes with exactly the disk's size. So a disk has at most one
    D or Z record per block, and a hostile host can make the appliance write nothing outside the disk.
    """

    def __init__(self, size: int, block_size: int, first_pass: bool = True) -> None:
        if size < 0 or block_size <= 0:
            raise ValueError(f"disk of {size} bytes in blocks of {block_size}")
        self.first_pass = first_pass
        self.size = size
        self.block_size = block_size
        self.blocks = block_count(size, block_size)
        self.next_block = 0  # the first block a D or Z record may start at
        self.read = 0

    def data(self, first: int, length: int) -> int:
        """Check a D record's header before its payload is read; return its number of blocks."""
        limit = max(wire.MAX_RUN, self.block_size)  # a run closes when it reaches MAX_RUN bytes
        if not 0 < length <= limit:
            raise ProtocolError(f"a data record of {length} bytes (the reader sends 1 to {limit})")
        count = -(-length // self.block_size)
        self._run("data", first, count)
        end = first * self.block_size + length
        if length % self.block_size and end != self.size:
            raise ProtocolError(f"a data record of blocks {first}+{count} with a short block before the disk's end")
        if end > self.size:
            raise ProtocolError(f"a data record of {length} bytes at block {first} past the disk's end")
        return count

    def zero(self, first: int, count: int) -> None:
        if count == 0:
            raise ProtocolError(f"an empty zero record at block {first}")
        self._run("zero", first, count)

    def _run(self, what: str, first: int, count: int) -> None:
        if first < self.next_block:
            raise ProtocolError(f"a {what} record at block {first}, after block {self.next_block - 1} was sent")
        if first + count > self.blocks:
            raise ProtocolError(
                f"a {what} record of blocks {first}..{first + count - 1} past the disk's end (block {self.blocks - 1})"
            )
        self.next_block = first + count

    def progress(self, read: int) -> None:
        if not self.first_pass:
            raise ProtocolError("a progress record in a later pass")
        if not self.read < read <= self.size:
            raise ProtocolError(f"progress of {read} bytes after {self.read}, on a disk of {self.size} bytes")
        self.read = read

    def end(self, read: int) -> None:
        if not self.first_pass:
            raise ProtocolError("an end-of-disk record in a later pass")
        if read != self.size:
            raise ProtocolError(f"the end of a disk of {self.size} bytes after {read} bytes")


def _hello(obj: dict[str, Any]) -> Hello:
    if obj.get("protocol") != wire.PROTOCOL:
        raise ProtocolError(f"a hello of protocol {printable(str(obj.get('protocol')), 20)} (this is {wire.PROTOCOL})")
    disks = obj.get("disks")
    if not isinstance(disks, list):
        raise ProtocolError("a hello without a list of disks")
    plan = obj.get("consistency")
    consistency = None
    if isinstance(plan, dict):
        consistency = (printable(str(plan.get("method", "?")), 20), printable(str(plan.get("why", "")), MAX_MESSAGE))
    tracked = obj.get("tracked", False)
    if not isinstance(tracked, bool):
        raise ProtocolError("a hello whose tracked flag is not true or false")
    untracked = printable(str(obj.get("untracked") or ""), MAX_MESSAGE)
    base_known = obj.get("base_known", False)
    if not isinstance(base_known, bool):
        raise ProtocolError("a hello whose base_known flag is not true or false")
    return Hello(
        printable(str(obj.get("python", "?")), 40), tuple(_remote_disk(d) for d in disks), consistency, tracked,
        untracked, base_known,
    )  # fmt: skip


def _remote_disk(d: object) -> RemoteDisk:
    if not isinstance(d, dict):
        raise ProtocolError("a hello whose disk is not a JSON object")
    path, size, kind, error = d.get("path"), d.get("size"), d.get("kind"), d.get("error", "")
    if not isinstance(path, str) or not isinstance(kind, str) or not isinstance(error, str):
        raise ProtocolError("a hello with a disk's path, kind or error that is not text")
    if type(size) is not int or size < -1:  # -1: a probe's disk that cannot be read
        raise ProtocolError(f"a hello with a disk size of {printable(str(size), 40)}")
    return RemoteDisk(path, size, printable(kind, 20), printable(error, MAX_MESSAGE))


def _moment(obj: dict[str, Any], disks: int) -> Moment:
    kind, passes, reread, seconds = obj.get("kind"), obj.get("passes", 0), obj.get("reread", []), obj.get("seconds", 0)
    if kind not in MOMENT_KINDS:
        raise ProtocolError(f"a moment record of kind {printable(str(kind), 20)!r}")
    if type(passes) is not int or passes < 0:
        raise ProtocolError("a moment record whose number of passes is not a count")
    if not isinstance(reread, list) or len(reread) != disks or any(type(n) is not int or n < 0 for n in reread):
        raise ProtocolError("a moment record without a byte count of each disk read again")
    if type(seconds) not in (int, float) or not 0 <= seconds < 86400:
        raise ProtocolError("a moment record whose freeze time is not a number of seconds")
    token = obj.get("token", "")
    if not isinstance(token, str) or len(token) > 100:
        raise ProtocolError("a moment record whose token is not a short text")
    timings = obj.get("timings")
    if not isinstance(timings, dict):
        timings = {}
    phases = {printable(str(k), 20): float(v) for k, v in list(timings.items())[:8] if type(v) in (int, float)}
    snapshots = obj.get("snapshots")
    said = tuple(printable(str(s), 200) for s in snapshots[:16]) if isinstance(snapshots, list) else ()
    return Moment(kind, float(seconds), passes, tuple(reread), _moment_detail(obj), token, phases, said)


def _moment_detail(obj: dict[str, Any]) -> str:
    """The moment's own words for what was missing or not frozen, as one line."""
    parts = []
    if obj.get("missing"):
        parts.append(str(obj["missing"]))
    not_frozen = obj.get("not_frozen")
    if isinstance(not_frozen, dict) and not_frozen:
        parts.append("not frozen: " + ", ".join(f"{k} ({v})" for k, v in list(not_frozen.items())[:8]))
    return printable("; ".join(parts), MAX_MESSAGE)


def _finished(obj: dict[str, Any]) -> Finished:
    hook = obj.get("post_hook")
    if hook is None:
        return Finished(None)
    if not isinstance(hook, dict) or type(hook.get("rc")) is not int:
        raise ProtocolError("a finished record whose post hook report has no exit status")
    return Finished({"hook": "post", "rc": hook["rc"], "output": printable(str(hook.get("output", "")), 2000)})


def printable(text: str, limit: int) -> str:
    """Text from the host made safe to show on one line: control characters (newlines, escape sequences
    that would move the cursor or rewrite the terminal) become spaces, and at most `limit` characters."""
    text = "".join(c if c.isprintable() else " " for c in text[: limit * 4]).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
