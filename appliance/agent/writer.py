# SPDX-License-Identifier: GPL-2.0-or-later
"""The writer that runs on a failback target (the repaired server, booted into a rescue system):
standard library only, Python 3.6+, sent over the SSH session's stdin like the reader.

It hashes what the target's disks already hold, so that only differing blocks are sent, writes the
blocks it is sent, and hashes the result to prove it. It never writes past the size it was asked to
fill, and it refuses a disk smaller than the VM's before anything is written.

Wire format (integers little-endian). Appliance -> target, after the code:
  request  u32 length + JSON {"disks": [{"path", "size", "block_size"}]}
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
  hello u32 length + JSON {"disks": [{"path", "size", "kind"} or {"path", "error"}]}
  h u32 count + count x 16-byte hash prefixes (blocks in order); e; f; g + 32 bytes
  r u64 first block + u32 count + count x 16-byte hash prefixes (blocks first, first+1, ...)
  X u32 length + JSON {"code", "message"}: fatal, nothing after it
"""

import hashlib
import json
import os
import stat
import struct
import sys

PREFIX_LEN = 16
CHUNK = 4 << 20
U32 = struct.Struct("<I")
DISK = struct.Struct("<I")
DATA = struct.Struct("<IQI")
ZEROES = struct.Struct("<IQQ")
RUN = struct.Struct("<QI")

BOOTSTRAP = 'import sys;exec(compile(sys.stdin.buffer.read(int(sys.argv[1])),"appliance-writer","exec"))'


class Fatal(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


def read_exact(stream, n):
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("appliance went away")
    return data


def send(out, *pieces):
    for piece in pieces:
        out.write(piece)


def json_record(obj):
    body = json.dumps(obj).encode()
    return U32.pack(len(body)) + body


def open_disk(path, size):
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None, {"path": path, "error": "%s does not exist" % path}
    except OSError as exc:
        return None, {"path": path, "error": "%s cannot be opened for writing: %s" % (path, exc.strerror)}
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        os.close(fd)
        return None, {"path": path, "error": "%s is neither a block device nor an image file" % path}
    actual = os.lseek(fd, 0, os.SEEK_END)
    info = {"path": path, "size": actual, "kind": "block" if stat.S_ISBLK(mode) else "file"}
    if actual < size:
        os.close(fd)
        info["error"] = "%s holds %d bytes, less than the %d of the VM's disk" % (path, actual, size)
        return None, info
    return fd, info


def block_hashes(fd, size, block_size, offset=0, end=None):
    """Yield the sha256 of each block from `offset` (a block boundary) to `end` (default: the first
    `size` bytes, the disk as the VM sees it), a chunk of blocks at a time."""
    zero = bytes(block_size)
    zero_hash = hashlib.sha256(zero).digest()
    end = size if end is None else min(end, size)
    while offset < end:
        want = min(CHUNK - CHUNK % block_size, end - offset)
        buf = os.pread(fd, want, offset)
        while len(buf) < want:
            more = os.pread(fd, want - len(buf), offset + len(buf))
            if not more:
                raise Fatal("disk-changed", "disk ended at %d bytes" % (offset + len(buf)))
            buf += more
        view = memoryview(buf)
        hashes = []
        for start in range(0, len(buf), block_size):
            length = min(block_size, len(buf) - start)
            if length == block_size and buf.startswith(zero, start):
                hashes.append(zero_hash)
            else:
                hashes.append(hashlib.sha256(view[start : start + length]).digest())
        yield hashes
        offset += want


def mark_written(written, offset, length, block_size):
    first = offset // block_size
    last = (offset + length - 1) // block_size
    written[first : last + 1] = b"\x01" * (last + 1 - first)


def read_back(out, fd, written, size, block_size):
    """Hash every block marked in `written` as the disk now holds it, and clear the marks."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, not from what was written
    block = written.find(1)
    while block >= 0:
        stop = written.find(0, block)
        stop = len(written) if stop < 0 else stop
        first = block
        for hashes in block_hashes(fd, size, block_size, block * block_size, stop * block_size):
            send(out, b"r", RUN.pack(first, len(hashes)), b"".join(h[:PREFIX_LEN] for h in hashes))
            first += len(hashes)
        written[block:stop] = bytes(stop - block)
        block = written.find(1, stop)
    send(out, b"e")
    out.flush()


def write_zeroes(fd, offset, length):
    zero = bytes(min(length, 1 << 20))
    while length:
        n = os.pwrite(fd, zero[: min(length, len(zero))], offset)
        offset += n
        length -= n


def main():
    stdin = sys.stdin.buffer
    out = sys.stdout.buffer
    fds = []
    try:
        request = json.loads(read_exact(stdin, U32.unpack(read_exact(stdin, U32.size))[0]).decode())
        disks = request["disks"]
        infos = []
        for d in disks:
            fd, info = open_disk(d["path"], int(d["size"]))
            fds.append(fd)
            infos.append(info)
        send(out, b"H", json_record({"disks": infos}))
        out.flush()
        if any(fd is None for fd in fds):
            return
        # blocks written since the disk was last hashed or read back, one byte each
        written = [bytearray(-(-int(d["size"]) // int(d["block_size"]))) for d in disks]
        while True:
            tag = read_exact(stdin, 1)
            if tag == b"D":
                disk, offset, length = DATA.unpack(read_exact(stdin, DATA.size))
                data = read_exact(stdin, length)
                if offset + length > int(disks[disk]["size"]):
                    raise Fatal("protocol", "write past the end of disk %d" % disk)
                if length:
                    mark_written(written[disk], offset, length, int(disks[disk]["block_size"]))
                view = memoryview(data)
                while view:
                    n = os.pwrite(fds[disk], view, offset)
                    view = view[n:]
                    offset += n
            elif tag == b"Z":
                disk, offset, length = ZEROES.unpack(read_exact(stdin, ZEROES.size))
                if offset + length > int(disks[disk]["size"]):
                    raise Fatal("protocol", "zeroes past the end of disk %d" % disk)
                if length:
                    mark_written(written[disk], offset, length, int(disks[disk]["block_size"]))
                write_zeroes(fds[disk], offset, length)
            elif tag == b"H":
                (disk,) = DISK.unpack(read_exact(stdin, DISK.size))
                d = disks[disk]
                written[disk][:] = bytes(len(written[disk]))
                for hashes in block_hashes(fds[disk], int(d["size"]), int(d["block_size"])):
                    send(out, b"h", U32.pack(len(hashes)), b"".join(h[:PREFIX_LEN] for h in hashes))
                send(out, b"e")
                out.flush()
            elif tag == b"R":
                (disk,) = DISK.unpack(read_exact(stdin, DISK.size))
                d = disks[disk]
                read_back(out, fds[disk], written[disk], int(d["size"]), int(d["block_size"]))
            elif tag == b"G":
                (disk,) = DISK.unpack(read_exact(stdin, DISK.size))
                d = disks[disk]
                digest = hashlib.sha256()
                for hashes in block_hashes(fds[disk], int(d["size"]), int(d["block_size"])):
                    digest.update(b"".join(hashes))
                send(out, b"g", digest.digest())
                out.flush()
            elif tag == b"F":
                for fd in fds:
                    os.fsync(fd)
                send(out, b"f")
                out.flush()
            elif tag == b"Q":
                return
            else:
                raise Fatal("protocol", "unknown command %r" % tag)
    except Fatal as exc:
        send(out, b"X", json_record({"code": exc.code, "message": str(exc)}))
        out.flush()
    except OSError as exc:
        send(out, b"X", json_record({"code": "io-error", "message": "write failed: %s" % exc.strerror}))
        out.flush()
    except EOFError:
        pass
    finally:
        for fd in fds:
            if fd is not None:
                try:
                    os.fsync(fd)
                except OSError:
                    pass


if __name__ == "__main__":
    main()
