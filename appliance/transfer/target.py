# SPDX-License-Identifier: GPL-2.0-or-later
"""The appliance's side of the failback writer's wire format (defined in `appliance.agent.wire`).

The target is trusted with nothing: every length it sends is checked against what its disks can need
before anything is read into memory (a JSON record is small; a series of hashes never covers more
blocks than the disk has), so a target that speaks garbage gets a ProtocolError, never the appliance's
memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from appliance.agent import wire
from appliance.ports import RemoteStream
from appliance.transfer.protocol import ProtocolError, RecordReader

MAX_JSON = 64 << 10  # a JSON record per disk: a path, an error message, the mount points that hold it


class TargetError(Exception):
    """The target reported a failure (code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TargetSession:
    """Commands to the writer on the target, over one SSH stream; the caller starts the stream.

    :raises ProtocolError: the target sent something that is not the writer's wire format.
    :raises TargetError: the writer reported a failure.
    :raises EOFError: the stream ended (the writer stopped, or the link broke).
    """

    def __init__(self, stream: RemoteStream) -> None:
        self.stream = stream
        self.records = RecordReader(stream.recv_some)
        self.blocks: list[int] = []  # per disk, once opened
        self.per_record: list[int] = []  # the most blocks one h or r record covers (the writer's chunk)
        self.opened = False  # the writer answered the request: it runs

    def open(self, disks: Sequence[tuple[str, int, int]], *, force: bool = False) -> list[dict[str, Any]]:
        """Send the request (path, size to fill, block size per disk); return what the target found, one
        dict per disk with its "path" and either its "size" and "kind" or an "error" (and "busy": what
        holds a disk in use). With `force`, the writer opens a disk in use too."""
        request = {"disks": [{"path": p, "size": s, "block_size": b} for p, s, b in disks], "force": force}
        body = json.dumps(request).encode()
        self.stream.write(wire.U32.pack(len(body)) + body)
        self.blocks = [-(-size // block_size) for _, size, block_size in disks]
        self.per_record = [max(1, wire.CHUNK // block_size) for _, _, block_size in disks]
        self._expect(b"H")
        infos = self._json(MAX_JSON * (1 + len(disks))).get("disks")
        if not isinstance(infos, list) or len(infos) != len(disks) or not all(_disk_info(i) for i in infos):
            raise ProtocolError(f"the target's answer does not describe the {len(disks)} disks asked for")
        self.opened = True
        return infos

    def hash_prefixes(self, disk: int) -> Iterator[bytes]:
        """The target's block hash prefixes (16 bytes each), in chunks, in block order: every block of
        the disk, no more, no less."""
        self.stream.write(b"H" + wire.WRITER_DISK.pack(disk))
        received, blocks = 0, self.blocks[disk]
        while self._more(b"h"):
            (count,) = wire.U32.unpack(self.records.read_exact(wire.U32.size))
            if received + count > blocks or count > self.per_record[disk]:
                raise ProtocolError(f"the target sent {count} hashes after {received} for a disk of {blocks} blocks")
            received += count
            yield bytes(self.records.read_exact(count * wire.PREFIX_LEN))
        if received != blocks:
            raise ProtocolError(f"the target sent hashes of {received} blocks for a disk of {blocks}")

    def read_back(self, disk: int) -> Iterator[tuple[int, bytes]]:
        """(first block, hash prefixes) of every block written since the last hash or read-back of the
        disk, as the target reads them from the disk after an fsync, cache dropped."""
        self.stream.write(b"R" + wire.WRITER_DISK.pack(disk))
        blocks = self.blocks[disk]
        while self._more(b"r"):
            first, count = wire.WRITER_RUN.unpack(self.records.read_exact(wire.WRITER_RUN.size))
            if first + count > blocks or count > self.per_record[disk]:
                raise ProtocolError(f"the target read back {count} blocks from block {first} of a disk of {blocks}")
            yield first, bytes(self.records.read_exact(count * wire.PREFIX_LEN))

    def write(self, disk: int, offset: int, data: bytes | memoryview) -> None:
        self.stream.write(b"D" + wire.WRITER_DATA.pack(disk, offset, len(data)))
        self.stream.write(data)

    def zeroes(self, disk: int, offset: int, length: int) -> None:
        self.stream.write(b"Z" + wire.WRITER_ZEROES.pack(disk, offset, length))

    def flush(self) -> None:
        self.stream.write(b"F")
        self._expect(b"f")

    def ask_digest(self, disk: int) -> None:
        """Ask for the digest of a disk as it is now; the target computes it while the caller goes on."""
        self.stream.write(b"G" + wire.WRITER_DISK.pack(disk))

    def read_digest(self) -> str:
        self._expect(b"g")
        return bytes(self.records.read_exact(32)).hex()

    def close(self) -> None:
        self.stream.write(b"Q")
        self.stream.close_stdin()

    def _tag(self) -> bytes:
        tag = bytes(self.records.read_exact(1))
        if tag == b"X":
            failure = self._json(MAX_JSON)
            raise TargetError(str(failure.get("code"))[:100], str(failure.get("message"))[:1000])
        return tag

    def _more(self, tag: bytes) -> bool:
        """True for one more `tag` record of a series, False at its end (e)."""
        got = self._tag()
        if got not in (tag, b"e"):
            raise ProtocolError(f"unexpected {got!r} in a series of {tag!r} records")
        return got == tag

    def _expect(self, tag: bytes) -> None:
        got = self._tag()
        if got != tag:
            raise ProtocolError(f"expected {tag!r} from the target, got {got!r}")

    def _json(self, limit: int) -> dict[str, Any]:
        (length,) = wire.U32.unpack(self.records.read_exact(wire.U32.size))
        if length > limit:
            raise ProtocolError(f"the target sent a record of {length} bytes, more than the {limit} it can need")
        try:
            doc = json.loads(bytes(self.records.read_exact(length)))
        except ValueError as exc:  # also a UnicodeDecodeError
            raise ProtocolError(f"the target sent a record that is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ProtocolError("the target sent a JSON record that is not an object")
        return doc


def _disk_info(info: object) -> bool:
    """One disk of the target's answer: a path, and an error or its size."""
    if not isinstance(info, dict) or not isinstance(info.get("path"), str):
        return False
    if "error" in info:
        return isinstance(info["error"], str) and isinstance(info.get("busy", ""), str)
    return isinstance(info.get("size"), int) and isinstance(info.get("busy", ""), str)
