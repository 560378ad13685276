# SPDX-License-Identifier: GPL-2.0-or-later
"""The appliance's side of the failback writer's wire format (defined in `appliance.agent.writer`)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from appliance.agent import writer as wire
from appliance.ports import RemoteStream
from appliance.transfer.protocol import ProtocolError, RecordReader


class TargetError(Exception):
    """The target reported a failure (code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TargetSession:
    """Commands to the writer on the target, over one SSH stream; the caller starts the stream."""

    def __init__(self, stream: RemoteStream) -> None:
        self.stream = stream
        self.records = RecordReader(stream.recv_some)

    def open(self, disks: Sequence[tuple[str, int, int]], *, force: bool = False) -> list[dict[str, Any]]:
        """Send the request (path, size to fill, block size per disk); return what the target found, one
        dict per disk with its "path" and either its "size" and "kind" or an "error" (and "busy": what
        holds a disk in use). With `force`, the writer opens a disk in use too."""
        request = {"disks": [{"path": p, "size": s, "block_size": b} for p, s, b in disks], "force": force}
        body = json.dumps(request).encode()
        self.stream.write(wire.U32.pack(len(body)) + body)
        self._expect(b"H")
        return list(self._json()["disks"])

    def hash_prefixes(self, disk: int) -> Iterator[bytes]:
        """The target's block hash prefixes (16 bytes each), in chunks, in block order."""
        self.stream.write(b"H" + wire.DISK.pack(disk))
        while self._more(b"h"):
            (count,) = wire.U32.unpack(self.records.read_exact(wire.U32.size))
            yield bytes(self.records.read_exact(count * wire.PREFIX_LEN))

    def read_back(self, disk: int) -> Iterator[tuple[int, bytes]]:
        """(first block, hash prefixes) of every block written since the last hash or read-back of the
        disk, as the target reads them from the disk after an fsync, cache dropped."""
        self.stream.write(b"R" + wire.DISK.pack(disk))
        while self._more(b"r"):
            first, count = wire.RUN.unpack(self.records.read_exact(wire.RUN.size))
            yield first, bytes(self.records.read_exact(count * wire.PREFIX_LEN))

    def write(self, disk: int, offset: int, data: bytes | memoryview) -> None:
        self.stream.write(b"D" + wire.DATA.pack(disk, offset, len(data)))
        self.stream.write(data)

    def zeroes(self, disk: int, offset: int, length: int) -> None:
        self.stream.write(b"Z" + wire.ZEROES.pack(disk, offset, length))

    def flush(self) -> None:
        self.stream.write(b"F")
        self._expect(b"f")

    def ask_digest(self, disk: int) -> None:
        """Ask for the digest of a disk as it is now; the target computes it while the caller goes on."""
        self.stream.write(b"G" + wire.DISK.pack(disk))

    def read_digest(self) -> str:
        self._expect(b"g")
        return bytes(self.records.read_exact(32)).hex()

    def close(self) -> None:
        self.stream.write(b"Q")
        self.stream.close_stdin()

    def _tag(self) -> bytes:
        tag = bytes(self.records.read_exact(1))
        if tag == b"X":
            failure = self._json()
            raise TargetError(str(failure.get("code")), str(failure.get("message")))
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

    def _json(self) -> dict[str, Any]:
        (length,) = wire.U32.unpack(self.records.read_exact(wire.U32.size))
        return dict(json.loads(bytes(self.records.read_exact(length))))
