# SPDX-License-Identifier: GPL-2.0-or-later
"""The wire formats of the code the appliance ships: the reader's (on a protected host) and the failback
writer's (on a failback target). Standard library only, Python 3.6+.

A module of its own because both ends need it: it is shipped at the head of the reader's and of the
writer's script (`appliance.agent.reader_source`, `writer_source`), and the appliance's side of each
format (`appliance.transfer.protocol`, `.replica`, `.target`) and the services import it, so the
appliance never imports the code that runs on a host. Change a format here and on both ends together.

The reader (all integers little-endian). Appliance -> host, after the code itself:
  request     u32 length + JSON  {"disks": [{"path", "block_size"}], "pre_hook": [argv], "post_hook": [argv],
              "consistency": "auto" | "lvm-snapshot" | "live", "freeze_limit": seconds}
  old hashes  per disk, after the host's hello, runs covering every block of the disk as it is now:
              u8 kind + u32 count (RUN); kind 1 (HASH) is followed by count x 16-byte hash prefixes;
              kind 0 (ZERO) and 2 (UNKNOWN) carry nothing
Host -> appliance, one record after another, each starting with a one-byte type:
  H u32+JSON  hello: python version and each disk's path, size and kind
  D u64 block, u32 length, then 32-byte hash of each block, then the block bytes (consecutive blocks)
  Z u64 block, u32 count: blocks that now read as zeroes
  P u64       bytes read so far on the current disk
  E u64 bytes read, 32-byte digest: end of the current disk's first (full) pass
  R u32 disk  a later pass over disk number `disk` (0-based, in the request's order): the D and Z
              records that follow, up to the next R, M or X record, are blocks of that disk read again
  M u32+JSON  the moment: what the point is (frozen, one moment, lvm-snapshot or a live read) and how it
              was taken
  F u32+JSON  finished: what the post hook did
  X u32+JSON  fatal error: {"code", "message", ...}; nothing after it
Each disk's first pass comes first, disks in order, each ended by its E record; then R passes, then M,
then F. Within a pass, D and Z records come in increasing block order and never overlap, a D record
carries 1 to MAX_RUN bytes and only the disk's last block may be short; P grows, E carries the disk's
size, and its digest is sha256 over the block hashes of the first pass. The appliance refuses anything
else as a protocol violation (appliance.transfer.protocol): keep them in step.

The writer (integers little-endian). Appliance -> target, after the code:
  request  u32 length + JSON {"disks": [{"path", "size", "block_size"}], "force": bool}
  then commands, each a one-byte tag:
    H u32 disk              hash the disk's blocks (answer: h records, then e)
    D u32 disk u64 offset u32 length, then the bytes     write them
    Z u32 disk u64 offset u64 length                     write zeroes
    F                       fsync every disk (answer: f)
    R u32 disk              read back every block written since the last H or R, after an fsync
                            and with the disk's cache dropped (answer: r records, then e)
    G u32 disk              digest of the disk as it is now (answer: g + 32 bytes)
    Q                       done
Target -> appliance:
  hello u32 length + JSON {"disks": [{"path", "size", "kind"} or {"path", "error"}]}; a disk in use
        also has "busy": what holds it (with "error" unless forced)
  h u32 count + count x 16-byte hash prefixes (blocks in order, at most a CHUNK's worth); e; f; g + 32 bytes
  r u64 first block + u32 count + count x 16-byte hash prefixes (blocks first, first+1, ...)
  X u32 length + JSON {"code", "message"}: fatal, nothing after it
"""

import struct
from typing import BinaryIO, List, Optional, Tuple

# -- both agents --------------------------------------------------------------------------------------

PREFIX_LEN = 16  # bytes of each old block hash sent to the host: 128 bits, collision-safe, half the upload
HASH_LEN = 32
CHUNK = 4 << 20  # bytes an agent reads at once; a multiple of every block size the appliance uses
U32 = struct.Struct("<I")


class Fatal(Exception):
    """What ends an agent's run with an X record: {"code", "message"} and the extra fields given."""

    def __init__(self, code: str, message: str, **extra: object) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.extra = extra


# -- the reader -----------------------------------------------------------------------------------------

PROTOCOL = 2
MAX_RUN = 1 << 20  # bytes of consecutive changed blocks sent in one D record

OLD_ZERO, OLD_HASH, OLD_UNKNOWN = 0, 1, 2
RUN = struct.Struct("<BI")
DATA = struct.Struct("<cQI")
ZERO = struct.Struct("<cQI")
PROGRESS = struct.Struct("<cQ")
END = struct.Struct("<cQ")
REPASS = struct.Struct("<cI")

FREEZE_TRIES = 3  # freezes a point may try before it is a live read: the appliance's deadline counts on it

# The one fixed command line the appliance runs: it reads the reader's script from stdin and executes it.
# The name it compiles it under shows in the host's process list (`pgrep -f appliance-reader`).
READER_BOOTSTRAP = 'import sys;exec(compile(sys.stdin.buffer.read(int(sys.argv[1])),"appliance-reader","exec"))'


class Hangup(Exception):
    """The session ended (SIGHUP/SIGTERM/SIGPIPE): stop reading, but still run the post hook."""


class OldHashes:
    """Reads the appliance's stream of previous block hashes, block by block, as the disk is read."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.kind = OLD_ZERO
        self.left = 0

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise Hangup("appliance closed the connection")
        return data

    def take(self, count: int) -> Tuple[bool, List[Optional[bytes]]]:
        """Return (all_zero, entries) for the next `count` blocks; entries[i] is None, a prefix, or b''."""
        entries: List[Optional[bytes]] = []
        all_zero = True
        while count:
            if not self.left:
                self.kind, self.left = RUN.unpack(self._read(RUN.size))
                if self.kind not in (OLD_ZERO, OLD_HASH, OLD_UNKNOWN):
                    raise Fatal("protocol", "bad old-hash run kind %r" % self.kind)
            n = min(count, self.left)
            if self.kind == OLD_ZERO:
                entries.extend([None] * n)
            elif self.kind == OLD_HASH:
                raw = self._read(n * PREFIX_LEN)
                entries.extend(raw[i : i + PREFIX_LEN] for i in range(0, len(raw), PREFIX_LEN))
                all_zero = False
            else:
                entries.extend([b""] * n)
                all_zero = False
            self.left -= n
            count -= n
        return all_zero, entries


# -- the failback writer --------------------------------------------------------------------------------

WRITER_DISK = struct.Struct("<I")  # H, R, G: the disk
WRITER_DATA = struct.Struct("<IQI")  # D: disk, offset, length
WRITER_ZEROES = struct.Struct("<IQQ")  # Z: disk, offset, length
WRITER_RUN = struct.Struct("<QI")  # r: first block, count

WRITER_BOOTSTRAP = 'import sys;exec(compile(sys.stdin.buffer.read(int(sys.argv[1])),"appliance-writer","exec"))'
