# SPDX-License-Identifier: GPL-2.0-or-later
"""The writer that runs on a failback target (the repaired server, booted into a rescue system):
standard library only, Python 3.6+, sent over the SSH session's stdin like the reader.

It hashes what the target's disks already hold, so that only differing blocks are sent, writes the
blocks it is sent, and hashes the result to prove it. It never writes past the size it was asked to
fill, and it refuses before anything is written a disk smaller than the VM's and, unless forced, a
disk in use on the target: a block device is opened with O_EXCL (the kernel's answer is EBUSY while it
or one of its partitions is mounted, held by device-mapper, LVM or md, or open exclusively), and an
image file that backs a loop device in use is refused too. The refusal names what holds the disk.

The wire format is defined in `appliance.agent.wire` (shipped ahead of this code); the appliance's side of
it is `appliance.transfer.target`.
"""

import errno
import hashlib
import json
import os
import re
import stat
import sys

from appliance.agent.wire import (
    CHUNK,
    PREFIX_LEN,
    U32,
    WRITER_DATA,
    WRITER_DISK,
    WRITER_RUN,
    WRITER_ZEROES,
    Fatal,
)


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


def open_disk(path, size, force=False):
    """(fd, info) of a target disk, or (None, info with "error") when it must not be written."""
    try:
        fd, busy = open_unless_busy(path, force)
    except FileNotFoundError:
        return None, {"path": path, "error": "%s does not exist" % path}
    except OSError as exc:
        return None, {"path": path, "error": "%s cannot be opened for writing: %s" % (path, exc.strerror)}
    if fd is None:
        return None, {"path": path, "busy": busy, "error": "%s is %s" % (path, busy)}
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        os.close(fd)
        return None, {"path": path, "error": "%s is neither a block device nor an image file" % path}
    actual = os.lseek(fd, 0, os.SEEK_END)
    info = {"path": path, "size": actual, "kind": "block" if stat.S_ISBLK(mode) else "file"}
    if busy:
        info["busy"] = busy  # forced: the appliance says so
    if actual < size:
        os.close(fd)
        info["error"] = "%s holds %d bytes, less than the %d of the VM's disk" % (path, actual, size)
        return None, info
    return fd, info


def open_unless_busy(path, force):
    """(fd, "") for a disk nobody uses; (None, what holds it) for one in use, or with `force`, (fd, what
    holds it). A block device is opened with O_EXCL, and it also keeps a mount away while it is open."""
    if not stat.S_ISBLK(os.stat(path).st_mode):
        busy = loop_in_use(path)
        return (None if busy and not force else os.open(path, os.O_RDWR)), busy
    try:
        return os.open(path, os.O_RDWR | os.O_EXCL), ""
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    busy = holders(os.stat(path).st_rdev) or "in use"
    return (os.open(path, os.O_RDWR) if force else None), busy


def holders(rdev):
    """What keeps a block device busy, in words: the mount points of it or of its partitions, else the
    devices stacked on it (device-mapper, LVM, md); "" when neither says."""
    name = sysfs_name(rdev)
    devices = {rdev}
    parts = [name] if name else []
    if name:
        for entry in listdir("/sys/class/block/%s" % name):
            dev = read_dev("/sys/class/block/%s/%s" % (name, entry))
            if dev is not None and os.path.exists("/sys/class/block/%s/%s/partition" % (name, entry)):
                devices.add(dev)
                parts.append(entry)
    mounts = [point for dev, point in mount_points() if dev in devices]
    if mounts:
        return "mounted on %s" % ", ".join(sorted(set(mounts)))
    held = [holder_name(h) for part in parts for h in listdir("/sys/class/block/%s/holders" % part)]
    if held:
        return "held by %s" % ", ".join(sorted(set(held)))
    return ""


def loop_in_use(path):
    """For an image file: "the backing file of /dev/loopN, which is mounted on ..." when a loop device
    in use reads it ("" otherwise)."""
    real = os.path.realpath(path)
    for loop in listdir("/sys/block"):
        backing = read_text("/sys/block/%s/loop/backing_file" % loop)
        dev = read_dev("/sys/block/%s" % loop)
        if backing == real and dev is not None:
            busy = holders(dev)
            if busy:
                return "the backing file of /dev/%s, which is %s" % (loop, busy)
    return ""


def sysfs_name(rdev):
    try:
        return os.path.basename(os.readlink("/sys/dev/block/%d:%d" % (os.major(rdev), os.minor(rdev))))
    except OSError:
        return ""


def holder_name(name):
    """A device-mapper holder by its name (vg-lv), any other by its kernel name (md0)."""
    return read_text("/sys/class/block/%s/dm/name" % name) or name


def mount_points():
    """(device number, mount point) of every mount this process sees (its mount namespace)."""
    found = []
    for line in read_text("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if len(fields) > 4 and ":" in fields[2]:
            major, minor = fields[2].split(":")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            found.append((os.makedev(int(major), int(minor)), point))
    return found


def read_dev(folder):
    text = read_text(folder + "/dev")
    if ":" not in text:
        return None
    major, minor = text.split(":")
    return os.makedev(int(major), int(minor))


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


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
            send(out, b"r", WRITER_RUN.pack(first, len(hashes)), b"".join(h[:PREFIX_LEN] for h in hashes))
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
            fd, info = open_disk(d["path"], int(d["size"]), bool(request.get("force")))
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
                disk, offset, length = WRITER_DATA.unpack(read_exact(stdin, WRITER_DATA.size))
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
                disk, offset, length = WRITER_ZEROES.unpack(read_exact(stdin, WRITER_ZEROES.size))
                if offset + length > int(disks[disk]["size"]):
                    raise Fatal("protocol", "zeroes past the end of disk %d" % disk)
                if length:
                    mark_written(written[disk], offset, length, int(disks[disk]["block_size"]))
                write_zeroes(fds[disk], offset, length)
            elif tag == b"H":
                (disk,) = WRITER_DISK.unpack(read_exact(stdin, WRITER_DISK.size))
                d = disks[disk]
                written[disk][:] = bytes(len(written[disk]))
                for hashes in block_hashes(fds[disk], int(d["size"]), int(d["block_size"])):
                    send(out, b"h", U32.pack(len(hashes)), b"".join(h[:PREFIX_LEN] for h in hashes))
                send(out, b"e")
                out.flush()
            elif tag == b"R":
                (disk,) = WRITER_DISK.unpack(read_exact(stdin, WRITER_DISK.size))
                d = disks[disk]
                read_back(out, fds[disk], written[disk], int(d["size"]), int(d["block_size"]))
            elif tag == b"G":
                (disk,) = WRITER_DISK.unpack(read_exact(stdin, WRITER_DISK.size))
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
