# SPDX-License-Identifier: GPL-2.0-or-later
"""The reader that runs on a protected host for one capture: standard library only, Python 3.6+.

It is not installed on the host: the appliance sends this file over the SSH session's stdin for every
run (see `wire.READER_BOOTSTRAP`), so the host needs nothing but sshd and python3, and the reader always matches
the appliance's version.

What it does, for each disk in turn: read it once, cut it into fixed-size blocks, hash each block
(sha256), compare with the previous point's hash that the appliance streams in on stdin, and send only
the blocks that differ. A block of zeroes is never sent: it is a one-line "zero" record when it used to
hold data, and nothing at all when it was zero already. The digest of the whole disk (sha256 over the
block hashes) goes with the end of each disk, so the appliance can prove what it stored.

Every point is one moment of the disks, where the kernel lets the reader prove it (see `Moment`): the
block layer's trace events (tracefs) report every write while the disks are read; the blocks written
meanwhile are read again, pass after pass while that set shrinks; then every file system on the disks
is frozen (FIFREEZE, by a watchdog process that thaws them whatever happens to the reader), the last
written blocks are read, and the file systems are thawed. Where the kernel cannot trace (no tracefs, a
locked-down kernel), disks that are LVM volumes are read from LVM snapshots the reader makes and removes
(`Snapshots`). Where neither can be done (a file instead of a block device, writes that outpace the
copy), the point is a live read and says so.
Disks are read with O_DIRECT: what is on the disk, never a stale page of the host's cache, and without
evicting the server's own cache.

The wire format is defined in `appliance.agent.wire` (shipped ahead of this code); the appliance's side of
it is `appliance.transfer.protocol`.
"""

import collections
import errno
import hashlib
import json
import mmap
import os
import queue
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time

from appliance.agent.wire import (
    CHUNK,
    DATA,
    END,
    FREEZE_TRIES,
    MAX_RUN,
    PREFIX_LEN,
    PROGRESS,
    PROTOCOL,
    REPASS,
    U32,
    ZERO,
    Fatal,
    Hangup,
    OldHashes,
)

PROGRESS_EVERY = 64 << 20
HOOK_TIMEOUT = 600


def _on_signal(signum, frame):
    raise Hangup("signal %d" % signum)


class Output:
    """Writes records to stdout from a thread of its own, so hashing and sending overlap."""

    def __init__(self, fd):
        self.fd = fd
        self.queue = queue.Queue(maxsize=8)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            pieces = self.queue.get()
            if pieces is None:
                return
            if self.error is not None:
                continue
            try:
                self._write_all(pieces)
            except OSError as exc:
                self.error = exc

    def _write_all(self, pieces):
        pieces = [memoryview(p).cast("B") for p in pieces if len(p)]
        while pieces:
            written = os.writev(self.fd, pieces[:512])
            while written and pieces:
                if written >= len(pieces[0]):
                    written -= len(pieces[0])
                    pieces.pop(0)
                else:
                    pieces[0] = pieces[0][written:]
                    written = 0

    def send(self, *pieces):
        if self.error is not None:
            raise Hangup("appliance went away: %s" % self.error)
        self.queue.put(pieces)

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise Hangup("appliance went away: %s" % self.error)


def _json_record(tag, obj):
    body = json.dumps(obj).encode()
    return tag + U32.pack(len(body)) + body


ALIGN = 4096  # O_DIRECT wants buffers, offsets and lengths aligned to the logical block size: a page covers all


class Disk(object):
    """One disk the host asked for: its descriptors (a direct one where the kernel allows it), size, kind."""

    def __init__(self, index, path, block_size):
        self.index = index
        self.path = path
        self.block_size = block_size
        self.fd, self.size, self.kind = open_disk(path)
        self.direct_fd = _open_direct(path) if self.kind == "block" else None
        self.local = threading.local()  # each thread's page-aligned buffer for direct reads, made on first use
        self.seek_lock = threading.Lock()
        self.rdev = os.fstat(self.fd).st_rdev if self.kind == "block" else None
        self.blocks = -(-self.size // block_size)

    def read(self, offset, length):
        """`length` bytes at `offset` as they are on the disk: direct I/O for a block device, so neither a
        stale page of the host's cache of the device (file data is written around that cache) nor a
        trace of this read in that cache. A file, or a device that refuses direct I/O, is read buffered."""
        if self.direct_fd is not None:
            try:
                return self._read_direct(offset, length)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.direct_fd)  # the device takes no direct I/O after all: buffered from here on
                self.direct_fd = None
        return _read_full(self.fd, offset, length, self.size)

    def _read_direct(self, offset, length):
        """Into a page-aligned buffer of the calling thread's own (the first pass reads in a thread of its own)."""
        span = -(-length // ALIGN) * ALIGN
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or len(buffer) < span:
            buffer = self.local.buffer = mmap.mmap(-1, max(span, CHUNK))
        view = memoryview(buffer)
        got = 0
        while got < length:
            n = self._preadv(view[got:span], offset + got)
            if n <= 0:
                raise Fatal("disk-changed", "disk ended at %d bytes, expected %d" % (offset + got, self.size))
            got += n
        data = bytes(view[:length])  # a copy: the buffer is reused by the next read
        view.release()
        return data

    def _preadv(self, view, offset):
        if hasattr(os, "preadv"):
            return os.preadv(self.direct_fd, [view], offset)
        with self.seek_lock:  # Python 3.6: lseek + readv share the descriptor's offset
            os.lseek(self.direct_fd, offset, os.SEEK_SET)
            return os.readv(self.direct_fd, [view])

    def read_from(self, path):
        """Read `path` (a snapshot of this disk, of the same size) instead of the disk, until read_origin()."""
        fd, size, kind = open_disk(path)
        if size != self.size or kind != "block":
            os.close(fd)
            raise Fatal("disk-changed", "%s is %d bytes, its origin %s %d" % (path, size, self.path, self.size))
        self.origin_fds = (self.fd, self.direct_fd)
        self.fd, self.direct_fd = fd, _open_direct(path)
        self.local = threading.local()

    def read_origin(self):
        origin = getattr(self, "origin_fds", None)
        if origin is not None:
            self._close_fds()
            self.fd, self.direct_fd = origin
            self.origin_fds = None

    def close(self):
        self.read_origin()
        self._close_fds()

    def _close_fds(self):
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None


def _open_direct(path):
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None


def _read_full(fd, offset, length, size):
    # pread into a new bytes object: no zero-filling of a fresh buffer, and glibc reuses the freed chunks,
    # so there are no page faults either (bytearray(want) cost a third of the time)
    buf = os.pread(fd, length, offset)
    while len(buf) < length:
        more = os.pread(fd, length - len(buf), offset + len(buf))
        if not more:
            raise Fatal("disk-changed", "disk ended at %d bytes, expected %d" % (offset + len(buf), size))
        buf += more
    return buf


def open_disk(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise Fatal("disk-missing", "%s does not exist" % path, path=path)
    except PermissionError:
        raise Fatal("disk-unreadable", "%s is not readable" % path, path=path)
    except OSError as exc:
        raise Fatal("disk-unreadable", "%s cannot be opened: %s" % (path, exc.strerror), path=path)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        os.close(fd)
        raise Fatal("disk-not-a-disk", "%s is neither a block device nor an image file" % path, path=path)
    size = os.lseek(fd, 0, os.SEEK_END)
    return fd, size, "block" if stat.S_ISBLK(mode) else "file"


ZERO_CHUNK = bytes(CHUNK)


class _HoleFinder(object):
    """Sparse image files: SEEK_DATA says where data is, so holes are never read. Block devices (and
    file systems without SEEK_DATA) answer nothing useful, and everything is read."""

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size
        self.next_data = 0
        self.enabled = hasattr(os, "SEEK_DATA") and stat.S_ISREG(os.fstat(fd).st_mode)

    def is_hole(self, offset, length):
        if not self.enabled:
            return False
        if self.next_data < offset:
            try:
                self.next_data = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset; EINVAL: not supported
                self.next_data = self.size
        return self.next_data >= offset + length


def chunks(disk):
    """Yield (offset, buffer) of the disk, read ahead by a thread so that I/O overlaps hashing."""
    q = queue.Queue(maxsize=4)
    size = disk.size
    holes = _HoleFinder(disk.fd, size)

    def reader():
        offset = 0
        try:
            while offset < size:
                want = min(CHUNK, size - offset)
                if want == CHUNK and holes.is_hole(offset, want):
                    q.put((offset, ZERO_CHUNK))  # a hole of a sparse image file reads as zeroes: skip the read
                else:
                    q.put((offset, disk.read(offset, want)))
                offset += want
            q.put(None)
        except OSError as exc:
            q.put(Fatal("read-error", "read failed at byte %d: %s" % (offset, exc.strerror), offset=offset))
        except Fatal as exc:
            q.put(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        yield item


def hash_chunk(buf, block_size):
    """Per block of the chunk: (is_zero, sha256). Runs in a worker thread: sha256 releases the GIL."""
    zero_full = bytes(block_size)
    zero_hash_full = hashlib.sha256(zero_full).digest()
    view = memoryview(buf)
    n = len(buf)
    out = []
    for start in range(0, n, block_size):
        length = min(block_size, n - start)
        if length == block_size:
            if buf.startswith(zero_full, start):
                out.append((True, zero_hash_full))
                continue
        elif buf.startswith(bytes(length), start):
            out.append((True, hashlib.sha256(bytes(length)).digest()))
            continue
        out.append((False, hashlib.sha256(view[start : start + length]).digest()))
    return Hashed(view, out)


class Hashed(object):
    __slots__ = ("buf", "blocks")

    def __init__(self, buf, blocks):
        self.buf = buf
        self.blocks = blocks


class _Inline:
    """Stands in for a thread pool on a one-CPU host."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args):
        return self._Done(fn(*args))

    def shutdown(self, wait=True):
        pass


def _hash_pool():
    workers = min(4, os.cpu_count() or 1)
    if workers < 2:
        return _Inline()
    import concurrent.futures

    return concurrent.futures.ThreadPoolExecutor(max_workers=workers)


def send_disk(disk, old, out, pool):
    """Read one disk, send what changed, return (bytes read, digest).

    Chunks are hashed by a pool of threads, a few chunks ahead, and compared in order here.
    """
    block_size = disk.block_size
    digest = hashlib.sha256()
    zero_hash_full = hashlib.sha256(bytes(block_size)).digest()
    zero_chunk = ZERO_CHUNK
    next_progress = PROGRESS_EVERY
    done = 0
    pending = collections.deque()

    def settle(item):
        offset, n, olds, hashed = item
        if hashed is None:  # all zero before and now: nothing to compare, nothing to send
            digest.update(zero_hash_full * len(olds))
        else:
            _send_chunk(hashed.result(), offset // block_size, block_size, n, olds, digest, out)

    for offset, buf in chunks(disk):
        n = len(buf)
        all_zero_before, olds = old.take(-(-n // block_size))
        if all_zero_before and n % block_size == 0 and (buf is zero_chunk or buf == zero_chunk[:n]):
            hashed = None
        else:
            hashed = pool.submit(hash_chunk, buf, block_size)
        pending.append((offset, n, olds, hashed))
        if len(pending) > 8:
            settle(pending.popleft())
        done += n
        if done >= next_progress:
            out.send(PROGRESS.pack(b"P", done))
            next_progress += PROGRESS_EVERY
    while pending:
        settle(pending.popleft())
    return done, digest.digest()


def _send_chunk(hashed, first, block_size, n, olds, digest, out):
    """Compare one chunk's blocks with the previous point and send the runs of changed blocks."""
    run_start = None  # first block of the pending run of changed data blocks
    run_hashes = []
    zero_start = None
    zero_count = 0
    buf = hashed.buf
    for j in range(len(olds)):
        is_zero, h = hashed.blocks[j]
        prev = olds[j]
        digest.update(h)
        if is_zero:
            changed = prev is not None  # was data or unknown: must become zeroes
        else:
            changed = prev is None or prev == b"" or prev != h[:PREFIX_LEN]
        # Close the pending runs that this block does not extend.
        if run_start is not None and (not changed or is_zero or (j - run_start) * block_size >= MAX_RUN):
            _flush_data(out, buf, first, run_start, j, block_size, n, run_hashes)
            run_start, run_hashes = None, []
        if zero_start is not None and not (changed and is_zero):
            out.send(ZERO.pack(b"Z", first + zero_start, zero_count))
            zero_start, zero_count = None, 0
        if not changed:
            continue
        if is_zero:
            if zero_start is None:
                zero_start = j
            zero_count += 1
        else:
            if run_start is None:
                run_start = j
            run_hashes.append(h)
    if run_start is not None:
        _flush_data(out, buf, first, run_start, len(olds), block_size, n, run_hashes)
    if zero_start is not None:
        out.send(ZERO.pack(b"Z", first + zero_start, zero_count))


def _flush_data(out, view, first, start, end, block_size, n, hashes):  # view: the chunk's memoryview
    lo = start * block_size
    hi = min(end * block_size, n)
    out.send(DATA.pack(b"D", first + start, hi - lo), b"".join(hashes), view[lo:hi])


# -- later passes: blocks read again ---------------------------------------------------------------------


def dirty_runs(disk, bitmap):
    """(first block, last block + 1) of each run of set blocks of `bitmap` (a byte per block), cut at MAX_RUN."""
    step = max(MAX_RUN // disk.block_size, 1)
    for m in DIRTY_RUN.finditer(bitmap):
        for first in range(m.start(), m.end(), step):
            yield first, min(first + step, m.end())


def read_runs(disk, bitmap):
    """Yield (first block, bytes) of the blocks set in `bitmap`, read from the disk run by run, in block order.

    One read at a time: reading four runs at once made the busy server's passes slower and its freezes
    longer (0.30-0.42 s against 0.18-0.23 s), its disk and CPUs being shared with the server's own writes."""
    bs = disk.block_size
    for first, end in dirty_runs(disk, bitmap):
        offset = first * bs
        yield first, disk.read(offset, min(end * bs, disk.size) - offset)


def send_runs(disk, runs, out):
    """Send blocks read again as one later pass over `disk`: an R record, then D and Z records; return the
    bytes read. Nothing is compared with what the appliance holds: a block written since it was read has
    almost always changed, and the appliance checks each block against its hash anyway."""
    out.send(REPASS.pack(b"R", disk.index))
    bs = disk.block_size
    total = 0
    for first, data in runs:
        total += len(data)
        view = memoryview(data)
        j = 0
        count = -(-len(data) // bs)
        while j < count:
            zero = _is_zero(view, j, bs)
            k = j + 1
            while k < count and _is_zero(view, k, bs) == zero:
                k += 1
            if zero:
                out.send(ZERO.pack(b"Z", first + j, k - j))
            else:
                hashes = [hashlib.sha256(view[i * bs : (i + 1) * bs]).digest() for i in range(j, k)]
                out.send(
                    DATA.pack(b"D", first + j, min(k * bs, len(data)) - j * bs),
                    b"".join(hashes),
                    bytes(view[j * bs : k * bs]),
                )
            j = k
    return total


def _is_zero(view, j, bs):
    piece = view[j * bs : (j + 1) * bs]
    return piece == bytes(len(piece))


# -- tracing writes: the block layer's trace events ---------------------------------------------------

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACE_BUFFER_KB = 4096  # per CPU; a busy disk's completions are ~50 bytes each, drained continuously
EVENT_LINE = re.compile(rb": (block_\w+|tracing_mark_write): (.*)$")
BLOCK_EVENT = re.compile(rb"^(\d+),(\d+) (\S+) (?:\(.*?\) )?(\d+) \+ (\d+)")
MARK = b"appliance-mark-"
DIRTY_RUN = re.compile(b"\x01+")
ONES = b"\x01" * 4096


class Unavailable(Exception):
    """What the reader needs for a frozen moment is missing here: the point is then a live read."""


def tracefs_root():
    """Where tracefs is mounted, mounting it where systemd would if nothing mounted it (as root)."""
    for root in TRACEFS:
        if os.path.isdir(os.path.join(root, "instances")):
            return root
    if os.path.isdir(TRACEFS[0]):
        done = subprocess.run(
            ["mount", "-t", "tracefs", "tracefs", TRACEFS[0]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if done.returncode == 0 and os.path.isdir(os.path.join(TRACEFS[0], "instances")):
            return TRACEFS[0]
        raise Unavailable("tracefs cannot be mounted: %s" % done.stderr.decode(errors="replace").strip()[-200:])
    raise Unavailable("this kernel has no tracefs")


def trace_target(disk):
    """(kernel dev number of the whole disk, byte offset of `disk` on it, request-based?) for a block device."""
    if disk.kind != "block":
        raise Unavailable("%s is an image file, not a block device" % disk.path)
    major, minor = os.major(disk.rdev), os.minor(disk.rdev)
    sysdir = os.path.realpath("/sys/dev/block/%d:%d" % (major, minor))
    offset = 0
    if os.path.exists(os.path.join(sysdir, "partition")):
        offset = int(_read_text(os.path.join(sysdir, "start"))) * 512
        sysdir = os.path.dirname(sysdir)
        major, minor = [int(x) for x in _read_text(os.path.join(sysdir, "dev")).split(":")]
    return (major << 20) | minor, offset, os.path.isdir(os.path.join(sysdir, "mq"))


def _read_text(path):
    with open(path) as f:
        return f.read().strip()


def _write_text(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Tracer(object):
    """Every write to the disks from now on, as sets of blocks between marks.

    A tracing instance of its own (so the host's own tracing is untouched), with the completion events
    of the disks' requests (bio events for bio-based devices such as device-mapper) filtered in the
    kernel to the disks and to anything but reads. A write that was in flight when tracing started
    completes after it: every change to a block after `start` is seen. A thread drains the events all
    the time; `mark` closes the current window and returns the blocks written in it.
    """

    def __init__(self, disks):
        self.disks = disks
        targets = [trace_target(d) for d in disks]
        root = tracefs_root()
        instances = os.path.join(root, "instances")
        _remove_stale_instances(instances)
        self.dir = os.path.join(instances, "appliance-%d" % os.getpid())
        try:
            os.mkdir(self.dir)
        except OSError as exc:
            raise Unavailable("a tracing instance cannot be made in %s: %s" % (instances, exc.strerror))
        self.fd = None
        try:
            self._setup(targets)
        except (OSError, Unavailable) as exc:
            self.close()
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable("block tracing cannot be set up: %s" % (exc.strerror or exc))
        self.lock = threading.Condition()
        self.window = {}
        self.closed = {}
        self.marks = 0
        self.error = None
        self.stop = False
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _setup(self, targets):
        self.ranges = {}  # kernel dev -> [(disk index, byte offset, size)]
        request_based = []
        bio_based = []
        for disk, (dev, offset, mq) in zip(self.disks, targets):
            self.ranges.setdefault(dev, []).append((disk.index, offset, disk.size))
            (request_based if mq else bio_based).append(dev)
        _write_text(os.path.join(self.dir, "buffer_size_kb"), str(TRACE_BUFFER_KB))
        _try_write(os.path.join(self.dir, "buffer_percent"), "0")
        events = [
            ("block_rq_complete", request_based),
            ("block_bio_queue", bio_based),
            ("block_bio_complete", bio_based),
        ]
        enabled = []
        for event, devs in events:
            if not devs:
                continue
            base = os.path.join(self.dir, "events", "block", event)
            if not os.path.isdir(base):
                raise Unavailable("this kernel has no %s trace event" % event)
            devs = sorted(set(devs))
            by_dev = " || ".join("dev == %d" % d for d in devs)
            try:  # reads are filtered in the kernel where its filter language allows, and here in any case
                _write_text(os.path.join(base, "filter"), '(%s) && !(rwbs ~ "R*")' % by_dev)
            except OSError:
                _write_text(os.path.join(base, "filter"), by_dev)
            enabled.append(base)
        self.fd = os.open(os.path.join(self.dir, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
        for base in enabled:
            _write_text(os.path.join(base, "enable"), "1")

    def _drain(self):
        rest = b""
        try:
            while not self.stop:
                try:
                    data = os.read(self.fd, 1 << 16)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EINTR):
                        raise
                    data = b""
                if not data:
                    select.select([self.fd], [], [], 0.02)
                    continue
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    self._event(line)
        except Exception as exc:  # reported by the next mark
            with self.lock:
                self.error = exc
                self.lock.notify_all()

    def _event(self, line):
        m = EVENT_LINE.search(line)
        if m is None:
            return
        if m.group(1) == b"tracing_mark_write":
            body = m.group(2).strip()
            if body.startswith(MARK):
                with self.lock:
                    self.closed[int(body[len(MARK) :])] = self.window
                    self.window = {}
                    self.lock.notify_all()
            return
        e = BLOCK_EVENT.match(m.group(2))  # the kernel's own text: `MAJ,MIN RWBS [(CMD)] SECTOR + COUNT`
        if e is None or e.group(3).startswith(b"R"):
            return
        sectors = int(e.group(5))
        if not sectors:
            return
        dev = (int(e.group(1)) << 20) | int(e.group(2))
        start = int(e.group(4)) * 512
        for index, offset, size in self.ranges.get(dev, ()):
            lo, hi = max(start - offset, 0), min(start + sectors * 512 - offset, size)
            if lo < hi:
                disk = self.disks[index]
                first, end = lo // disk.block_size, -(-hi // disk.block_size)
                with self.lock:
                    bitmap = self.window.get(index)
                    if bitmap is None:
                        bitmap = self.window[index] = bytearray(disk.blocks)
                    bitmap[first:end] = ONES[: end - first] if end - first <= len(ONES) else b"\x01" * (end - first)

    def mark(self, timeout=10.0):
        """Close the current window: {disk index: bitmap of the blocks written in it, a byte per block}, every
        write completed before
        this call included (the mark goes through the same buffers, after them)."""
        self.marks += 1
        n = self.marks
        _write_text(os.path.join(self.dir, "trace_marker"), (MARK + str(n).encode()).decode())
        deadline = time.monotonic() + timeout
        with self.lock:
            while n not in self.closed and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable("the trace marker did not come back in %d s" % timeout)
                self.lock.wait(left)
            if self.error is not None:
                raise Unavailable("reading the trace failed: %s" % self.error)
            return self.closed.pop(n)

    def lost(self):
        """Events the kernel dropped or overwrote, over all CPUs (0 while nothing was lost)."""
        total = 0
        per_cpu = os.path.join(self.dir, "per_cpu")
        for cpu in os.listdir(per_cpu):
            for line in _read_text(os.path.join(per_cpu, cpu, "stats")).splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("overrun", "commit overrun", "dropped events"):
                    total += int(value.split()[0])
        return total

    def close(self):
        self.stop = True
        if getattr(self, "thread", None) is not None:
            self.thread.join(1)
        for event in ("block_rq_complete", "block_bio_queue", "block_bio_complete"):
            _try_write(os.path.join(self.dir, "events", "block", event, "enable"), "0")
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


def _try_write(path, text):
    try:
        _write_text(path, text)
    except OSError:
        pass


def _remove_stale_instances(instances):
    """Instances of readers that were killed (SIGKILL leaves them): their buffers are the host's memory."""
    try:
        names = os.listdir(instances)
    except OSError:
        return
    for name in names:
        if not name.startswith("appliance-"):
            continue
        try:
            os.kill(int(name[len("appliance-") :]), 0)
        except ProcessLookupError:
            try:
                os.rmdir(os.path.join(instances, name))
            except OSError:
                pass
        except (ValueError, OSError):
            pass


# -- the file systems on the disks, and freezing them ----------------------------------------------------

NOT_FREEZABLE = ("vfat", "msdos", "exfat", "ntfs", "ntfs3", "fuseblk", "iso9660", "squashfs", "erofs")


def block_devices_on(disks):
    """'major:minor' of every block device whose writes land on the disks: the disks, their partitions, and
    what is built on them (device-mapper, LVM volumes, md), found through sysfs holders."""
    seen = set()
    todo = ["%d:%d" % (os.major(d.rdev), os.minor(d.rdev)) for d in disks if d.kind == "block"]
    while todo:
        dev = todo.pop()
        if dev in seen:
            continue
        seen.add(dev)
        sysdir = os.path.realpath("/sys/dev/block/%s" % dev)
        children = []
        try:
            children = [os.path.join(sysdir, "holders", h) for h in os.listdir(os.path.join(sysdir, "holders"))]
            children += [
                os.path.join(sysdir, p)
                for p in os.listdir(sysdir)
                if os.path.exists(os.path.join(sysdir, p, "partition"))
            ]
        except OSError:
            pass
        for child in children:
            try:
                todo.append(_read_text(os.path.join(child, "dev")))
            except OSError:
                pass
    return seen


def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystems_on(disks):
    """[(mount point, type, 'major:minor', read-only)] of each file system that lives on the disks, once per
    file system (bind mounts and the same file system mounted twice are frozen once)."""
    devices = block_devices_on(disks)
    found = {}
    try:
        lines = _read_text("/proc/self/mountinfo").splitlines()
    except OSError:
        return []
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 6 or len(rest) < 2:
            continue
        dev, mountpoint, options = fields[2], _unescape(fields[4]), fields[5].split(",")
        if dev not in devices:
            try:  # btrfs and a few others show an anonymous device: their source names the real one
                st = os.stat(_unescape(rest[1]))
                dev = "%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISBLK(st.st_mode) else dev
            except OSError:
                pass
        if dev in devices and dev not in found:
            found[dev] = (mountpoint, rest[0], dev, "ro" in options)
    return list(found.values())


def swap_ranges(disks):
    """{disk index: [(first block, last block)]} of swap partitions on the disks: what is written there is
    never part of a file system's state, so it does not count against the moment."""
    ranges = {}
    try:
        lines = _read_text("/proc/swaps").splitlines()[1:]
    except OSError:
        return ranges
    for line in lines:
        try:
            st = os.stat(_unescape(line.split()[0]))
        except (OSError, IndexError):
            continue
        if not stat.S_ISBLK(st.st_mode):
            continue
        sysdir = os.path.realpath("/sys/dev/block/%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)))
        if not os.path.exists(os.path.join(sysdir, "partition")):
            continue
        parent = _read_text(os.path.join(os.path.dirname(sysdir), "dev"))
        start = int(_read_text(os.path.join(sysdir, "start"))) * 512
        length = int(_read_text(os.path.join(sysdir, "size"))) * 512
        for d in disks:
            if d.kind == "block" and "%d:%d" % (os.major(d.rdev), os.minor(d.rdev)) == parent:
                bs = d.block_size
                ranges.setdefault(d.index, []).append((start // bs, (start + length - 1) // bs))
    return ranges


# The watchdog: a process of its own (new session: an SSH hangup does not reach it) that freezes and thaws
# the file systems for the reader, and removes the LVM snapshots the reader made. It thaws them when the
# reader asks, when the reader goes away (its stdin ends: the reader exited or was killed with SIGKILL),
# when the SSH session goes away (the reader's output, which it watches, is closed by sshd) and when the
# hard limit passes, whichever comes first: a freeze never outlives its run. When the reader goes away,
# it also removes every snapshot the reader left (one left behind would fill up, or fill its thin pool,
# and slow the server's writes). It imports everything before it is asked to freeze, and touches no file
# system while one is frozen.
WATCHDOG = r"""
import errno, fcntl, json, os, select, signal, subprocess, sys, time
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
limit = float(sys.argv[1])
paths = json.loads(sys.argv[2])
lvm = sys.argv[4]
fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in paths]
frozen = []
snapshots = []
since = None
expired = False
def thaw():
    while frozen:
        try:
            fcntl.ioctl(fds[frozen.pop()], FITHAW, 0)
        except OSError:
            pass
def drop_snapshots():
    while snapshots:
        try:
            subprocess.run([lvm, "lvremove", "--force", "--yes", snapshots.pop()], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        except Exception:
            pass
def leave(code):
    thaw()
    drop_snapshots()
    os._exit(code)
def on_term(signum, frame):
    leave(1)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
def say(obj):
    try:
        os.write(1, (json.dumps(obj) + "\n").encode())
    except OSError:
        leave(1)
say({"ready": True})
pending = b""
watch = select.poll()
watch.register(0, select.POLLIN)
session = int(sys.argv[3])
if session >= 0:
    watch.register(session, 0)  # the reader's output to sshd: POLLERR/POLLHUP once the session is gone
while True:
    timeout = None if since is None else max(0.0, since + limit - time.monotonic()) * 1000
    events = dict(watch.poll(timeout))
    if not events:
        thaw()
        since, expired = None, True
        continue
    if session in events:
        leave(0)
    data = os.read(0, 4096)
    if not data:
        leave(0)
    pending += data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        if line == b"F":
            expired, states = False, {}
            since = time.monotonic()
            for i, fd in enumerate(fds):
                try:
                    fcntl.ioctl(fd, FIFREEZE, 0)
                    frozen.append(i)
                    states[paths[i]] = "frozen"
                except OSError as exc:
                    states[paths[i]] = "already frozen" if exc.errno == errno.EBUSY else os.strerror(exc.errno)
            say({"states": states, "seconds": time.monotonic() - since})
        elif line == b"T":
            held = None if since is None else time.monotonic() - since
            thaw()
            since = None
            say({"held": held, "expired": expired})
        elif line[:2] == b"S ":  # a snapshot the reader made: removed if the reader goes away
            snapshots.append(line[2:].decode())
            say({"kept": True})
        elif line[:2] == b"U ":  # ... which the reader removed itself
            name = line[2:].decode()
            snapshots[:] = [s for s in snapshots if s != name]
            say({"kept": False})
"""


class Watchdog(object):
    """The reader's side of the watchdog: freeze() and thaw() through it, snapshots made known to it, and
    nothing held or left behind if the reader dies."""

    def __init__(self, mountpoints, limit, session_fd, lvm=""):
        self.limit = limit
        argv = [sys.executable or "python3", "-I", "-S", "-c", WATCHDOG, repr(float(limit)), json.dumps(mountpoints)]
        session = os.dup(session_fd)  # a number of its own: the watchdog's 0 and 1 are its pipes to the reader
        try:
            self.proc = self._start(argv + [str(session), lvm], session)
        finally:
            os.close(session)
        self.pending = b""
        if not self._answer(30).get("ready"):
            raise Unavailable("the freeze watchdog did not start")

    @staticmethod
    def _start(argv, session):
        return subprocess.Popen(
            argv,
            pass_fds=(session,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )

    def _answer(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Unavailable("the freeze watchdog did not answer in %d s" % timeout)
            data = os.read(fd, 4096)
            if not data:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise Unavailable("the freeze watchdog ended: %s" % (err[-1] if err else "no message"))
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line.decode())

    def _ask(self, what, timeout):
        try:
            self.proc.stdin.write(what)
            self.proc.stdin.flush()
        except OSError as exc:
            raise Unavailable("the freeze watchdog went away: %s" % exc)
        return self._answer(timeout)

    def freeze(self):
        """{mount point: 'frozen' | 'already frozen' | why not}, once every file system was asked."""
        return self._ask(b"F\n", self.limit + 60)["states"]

    def thaw(self):
        """(seconds the freeze held, whether the watchdog had to end it at its limit)."""
        answer = self._ask(b"T\n", 30)
        return answer.get("held") or 0.0, bool(answer.get("expired"))

    def keep(self, snapshot):
        """The watchdog removes `snapshot` (vg/lv) if the reader goes away before it does."""
        self._ask(b"S " + snapshot.encode() + b"\n", 30)

    def forget(self, snapshot):
        """The reader removed `snapshot` itself."""
        self._ask(b"U " + snapshot.encode() + b"\n", 30)

    def close(self):
        """Thaw whatever is frozen and end the watchdog (its stdin closes)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # SIGTERM: it thaws, then exits
            self.proc.wait()


# -- LVM snapshots: the moment where the kernel cannot trace writes ----------------------------------------

LVM = ("/usr/sbin/lvm", "/sbin/lvm", "/usr/bin/lvm")
LVS_FIELDS = (
    "vg_name,lv_name,lv_path,lv_attr,segtype,pool_lv,lv_kernel_major,lv_kernel_minor,lv_size,"
    "lv_tags,vg_free_count,vg_extent_size,snap_percent,data_percent"
)
SNAPSHOT_TAG = "appliance-snapshot"
SNAPSHOT_MARK = "-appliance-"  # a snapshot's name: <volume>-appliance-<pid of the reader that made it>
SNAPSHOT_WATCH = 1.0  # seconds between two looks at a thick snapshot's fill level during the read
LVM_TIMEOUT = 120


def lvm_binary():
    for path in LVM:
        if os.access(path, os.X_OK):
            return path
    raise Unavailable("LVM is not installed (no lvm command)")


def _lvm(lvm, args):
    """lvm's stdout; :raises Unavailable: it failed (its last line of stderr says why)."""
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1", LC_ALL="C")
    try:
        done = subprocess.run([lvm] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, timeout=LVM_TIMEOUT)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise Unavailable("lvm %s did not finish in %d s" % (args[0], LVM_TIMEOUT))
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise Unavailable("lvm %s: %s" % (args[0], lines[-1].strip() if lines else "exit %d" % done.returncode))
    return done.stdout.decode(errors="replace")


def logical_volumes(lvm, names=()):
    """[{field: value}] of every LVM volume on the host (or of `names`, vg/lv), sizes in bytes."""
    out = _lvm(lvm, ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LVS_FIELDS] + list(names))
    try:
        return [lv for report in json.loads(out)["report"] for lv in report["lv"]]
    except (ValueError, KeyError, TypeError):
        raise Unavailable("lvm lvs answered something else than its JSON report")


def _percent(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class Snapshot(object):
    """One disk that is an LVM volume, and the snapshot of it the reader reads instead."""

    def __init__(self, disk, lv):
        self.disk = disk
        self.origin = "%s/%s" % (lv["vg_name"], lv["lv_name"])
        self.vg = lv["vg_name"]
        self.thin = lv["segtype"] == "thin"
        self.pool = "%s/%s" % (lv["vg_name"], lv["pool_lv"]) if self.thin else None
        self.size = int(lv["lv_size"])
        self.extent = int(lv["vg_extent_size"])
        self.name = "%s%s%d" % (lv["lv_name"][:100], SNAPSHOT_MARK, os.getpid())
        self.full_name = "%s/%s" % (self.vg, self.name)
        self.made = False
        self.fill = 0.0  # percent of a thick snapshot's space used, or of a thin snapshot's pool
        self.overflowed = False

    def describe(self):
        if self.thin:
            return "%s: thin snapshot, pool %s %.0f%% full" % (self.origin, self.pool, self.fill)
        return "%s: thick snapshot, %.1f%% of its space used" % (self.origin, self.fill)


class Snapshots(object):
    """The reader's LVM snapshots of its disks: made in a moment, read instead of the disks, watched while
    read (a thick one that fills up is invalid: the point is then discarded), and removed afterwards.

    A thin volume's snapshot shares its pool: nothing to size. A thick one gets the volume group's free
    extents, up to the volume's own size (then it can never fill up)."""

    def __init__(self, disks):
        self.lvm = lvm_binary()
        self.volumes = logical_volumes(self.lvm)
        volumes = dict(((int(lv["lv_kernel_major"] or -1), int(lv["lv_kernel_minor"] or -1)), lv)
                       for lv in self.volumes)  # fmt: skip
        self.snapshots = []
        for disk in disks:
            if disk.kind != "block":
                raise Unavailable("%s is an image file, not an LVM volume" % disk.path)
            lv = volumes.get((os.major(disk.rdev), os.minor(disk.rdev)))
            if lv is None:
                raise Unavailable("%s is not an LVM volume" % disk.path)
            if lv["lv_attr"][:1] in ("s", "S"):
                raise Unavailable("%s is itself a thick LVM snapshot" % disk.path)
            self.snapshots.append(Snapshot(disk, lv))
        self.stop = threading.Event()
        self.watcher = None

    def take(self, watchdog):
        """Make every snapshot (known to the watchdog first, so that none outlives the reader) and read the
        disks from them. :raises Unavailable: one could not be made; none is left."""
        _remove_stale_snapshots(self.lvm, self.volumes)
        try:
            for snap in self.snapshots:
                self._make(snap, watchdog)
            for snap in self.snapshots:
                snap.disk.read_from(self._device(snap))
        except (Unavailable, Fatal):
            self.remove(watchdog)
            raise

    def _make(self, snap, watchdog):
        args = ["lvcreate", "--snapshot", "--yes", "--name", snap.name, "--addtag", SNAPSHOT_TAG]
        if snap.thin:
            args += ["--setactivationskip", "n", "--activate", "y"]
        else:
            (lv,) = logical_volumes(self.lvm, [snap.origin])
            free, wanted = int(lv["vg_free_count"]), snap.size // snap.extent + 2 + snap.size // snap.extent // 64
            if free < 1:
                raise Unavailable("volume group %s has no free extents for a snapshot of %s" % (snap.vg, snap.origin))
            args += ["--extents", str(min(free, wanted))]
        watchdog.keep(snap.full_name)
        snap.made = True
        _lvm(self.lvm, args + [snap.origin])

    def _device(self, snap):
        (lv,) = logical_volumes(self.lvm, [snap.full_name])
        path = lv["lv_path"] or "/dev/%s" % snap.full_name
        deadline = time.monotonic() + 30
        while not os.path.exists(path):  # udev makes the node; without udev, lvm itself
            if time.monotonic() > deadline:
                raise Unavailable("the snapshot %s has no device node %s" % (snap.full_name, path))
            time.sleep(0.1)
        return path

    def watch(self):
        """Look at the fill levels while the disks are read, in a thread of its own."""
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self):
        while not self.stop.wait(SNAPSHOT_WATCH):
            try:
                self.look()
            except Unavailable:
                pass

    def look(self):
        """Each snapshot's fill level now; a thick one that filled up is overflowed (and invalid)."""
        names = [s.pool if s.thin else s.full_name for s in self.snapshots if s.made]
        found = dict(("%s/%s" % (lv["vg_name"], lv["lv_name"]), lv) for lv in logical_volumes(self.lvm, names))
        for snap in self.snapshots:
            lv = found.get(snap.pool if snap.thin else snap.full_name)
            if lv is None:
                continue
            if snap.thin:
                snap.fill = max(snap.fill, _percent(lv["data_percent"]))
            else:
                snap.fill = max(snap.fill, _percent(lv["snap_percent"]))
                snap.overflowed = snap.overflowed or lv["lv_attr"][4:5] == "I" or snap.fill >= 100.0

    def overflowed(self):
        """The snapshots that filled up during the read (their content is gone), after a last look."""
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join()
        self.look()
        return [s for s in self.snapshots if s.overflowed]

    def remove(self, watchdog):
        """Read the disks themselves again and remove every snapshot made (the watchdog forgets them)."""
        self.stop.set()
        for snap in self.snapshots:
            snap.disk.read_origin()
            if not snap.made:
                continue
            if _remove_snapshot(self.lvm, snap.full_name):
                snap.made = False
                watchdog.forget(snap.full_name)  # otherwise the watchdog tries again when the reader ends


def _remove_snapshot(lvm, name, tries=5):
    for attempt in range(tries):  # udev may still hold the new node for a moment
        try:
            _lvm(lvm, ["lvremove", "--force", "--yes", name])
            return True
        except Unavailable as exc:
            if attempt == tries - 1:
                sys.stderr.write("the snapshot %s was not removed: %s\n" % (name, exc))
                return False
            time.sleep(1)


def _remove_stale_snapshots(lvm, volumes):
    """Snapshots an earlier reader made and could not remove (its host crashed with it, say), among
    `volumes` (the listing the disks were matched in: no second `lvs` per point)."""
    for lv in volumes:
        name = lv["lv_name"]
        if SNAPSHOT_TAG not in lv["lv_tags"].split(",") or SNAPSHOT_MARK not in name:
            continue
        try:
            os.kill(int(name.rsplit(SNAPSHOT_MARK, 1)[1]), 0)
            continue  # its reader is alive: another run's
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        _remove_snapshot(lvm, "%s/%s" % (lv["vg_name"], name), tries=1)


def run_hook(argv, name):
    if not argv:
        return None
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=HOOK_TIMEOUT
        )
    except FileNotFoundError:
        return {"hook": name, "rc": 127, "output": "%s: command not found" % argv[0]}
    except subprocess.TimeoutExpired:
        return {"hook": name, "rc": -1, "output": "timed out after %d s" % HOOK_TIMEOUT}
    return {"hook": name, "rc": done.returncode, "output": done.stdout.decode(errors="replace")[-2000:]}


# -- one point: a live read, or one moment ------------------------------------------------------------

FREEZE_AT = 32 << 20  # bytes written during a pass small enough to read again while frozen: freeze now
FREEZE_MAX = 256 << 20  # more than this written up to the freeze (its flush included): thaw, try again
MAX_PASSES = 8  # passes after the first before freezing whatever is left
FREEZE_LIMIT = 10.0  # seconds the watchdog lets a freeze last, whatever happens to the reader


class Hooks(object):
    """The user's pre and post hooks. The post hook undoes what the pre hook did, whatever happens, but only
    once the pre hook succeeded: after a failed (or interrupted) `fsfreeze -f` it would thaw a freeze that
    belongs to someone else."""

    def __init__(self, request):
        self.pre_argv = request.get("pre_hook") or None
        self.post_argv = request.get("post_hook") or None
        self.armed = False
        self.ran = False
        self.result = None

    def pre(self):
        """Once per point: a live read after a snapshot that could not be made does not quiesce twice."""
        if self.ran:
            return
        self.ran = True
        result = run_hook(self.pre_argv, "pre")
        if result is not None and result["rc"] != 0:
            raise Fatal("pre-hook-failed", "pre hook exited %d: %s" % (result["rc"], result["output"].strip()[-300:]))
        self.armed = True

    def post(self):
        """Once, right after the moment where that is known (a snapshot made), else at the end; what it did."""
        if self.armed:
            self.armed = False
            self.result = run_hook(self.post_argv, "post")
        return self.result


def _merge(into, more):
    """Both windows' written blocks, in `into` ({disk index: bitmap})."""
    for index, bitmap in more.items():
        mine = into.get(index)
        if mine is None:
            into[index] = bitmap
        else:
            both = int.from_bytes(mine, "little") | int.from_bytes(bitmap, "little")
            into[index] = bytearray(both.to_bytes(len(mine), "little"))
    return into


class Tracking(object):
    """What a reader that stays on the host between points keeps: its tracer, left running, and the token of
    the last point it took as one moment, from which the tracer has every block written since. The next
    point reads only those blocks, if the appliance names that token (it published that very point) and
    nothing is in doubt: the same disks of the same sizes, and no trace event lost since."""

    def __init__(self):
        self.tracer = None
        self.geometry = None
        self.token = None
        self.lost = 0

    def tracer_for(self, disks):
        geometry = [(d.path, d.size, d.block_size) for d in disks]
        if self.tracer is not None and geometry != self.geometry:
            self.close()
        if self.tracer is None:
            self.tracer = Tracer(disks)
            self.geometry = geometry
        return self.tracer

    def tracks(self, token):
        """Whether this point can read only the blocks written since the point `token` names; if not, why."""
        if token is None:
            return False, ""
        if self.token is None:
            return False, "the reader has no point to start from (its disks changed, or its last point was live)"
        if token != self.token:
            return False, "the appliance's newest point is not the reader's last one"
        if self.tracer.lost() != self.lost:
            return False, "trace events were lost since the last point"
        return True, ""

    def forget(self):
        self.token = None

    def remember(self, lost):
        """This point is the base of the next one: its token, for the appliance to name next time."""
        self.token = "%d-%s" % (os.getpid(), os.urandom(8).hex())
        self.lost = lost
        return self.token

    def close(self):
        if self.tracer is not None:
            self.tracer.close()
        self.tracer = self.geometry = self.token = None


class Capture(object):
    """One point of all the disks. `run` returns the moment record: what the point is and how it was taken."""

    def __init__(self, request, disks, out, old, pool, hooks):
        self.request = request
        self.disks = disks
        self.out = out
        self.old = old
        self.pool = pool
        self.hooks = hooks
        self.reread = [0] * len(disks)
        self.passes = 0
        self.timings = {}  # seconds per phase, for the appliance's log

    def prepare(self, tracking):
        """Start tracing (or take the tracer a resident reader kept running) before the hello, which says
        whether this point reads only the blocks written since the last one (`tracked`)."""
        self.tracking = tracking
        self.tracer = None
        self.tracked = False
        self.missing = None
        self.snapshots = None
        mode = self.request.get("consistency")
        if mode == "live":
            self.missing = "live reads were asked for"
        elif mode != "lvm-snapshot":
            try:
                self.tracer = tracking.tracer_for(self.disks) if tracking else Tracer(self.disks)
            except Unavailable as exc:
                self.missing = str(exc)
        if self.tracer is None and mode != "live":  # the fallback, or what the host asked for
            try:
                self.snapshots = Snapshots(self.disks)
            except Unavailable as exc:
                self.missing = "; ".join(filter(None, [self.missing, "no LVM snapshot: %s" % exc]))
        self.untracked = ""
        if tracking is not None and self.tracer is not None:
            self.tracked, self.untracked = tracking.tracks(self.request.get("track_from"))
        if tracking is not None:
            tracking.forget()  # from here on, only this point can become the base of the next one
        if self.tracer is not None:
            self.lost_base = tracking.lost if self.tracked else self.tracer.lost()
        return self.tracked

    def run(self):
        if self.snapshots is not None:
            return self._from_snapshots(self.snapshots)
        if self.tracer is None:
            return self._live(self.missing)
        try:
            moment = self._moment(self.tracer)
        finally:
            if self.tracking is None:
                self.tracer.close()
        if self.tracking is not None and moment["kind"] in ("frozen", "moment"):
            moment["token"] = self.tracking.remember(self.lost_base)
        return moment

    def _lost(self, tracer):
        return tracer.lost() != self.lost_base

    def _first_pass(self):
        for disk in self.disks:
            read, digest = send_disk(disk, self.old, self.out, self.pool)
            self.out.send(END.pack(b"E", read), digest)

    def _live(self, missing):
        self.hooks.pre()  # around the whole read: the user's only way to make a live read consistent
        self._first_pass()
        return self._record("live", missing=missing)

    def _from_snapshots(self, snapshots):
        """The pre hook, a snapshot of every disk (LVM suspends each volume for it: its file system is
        flushed and frozen that long), the post hook, then the first pass from the snapshots. A thick
        snapshot that filled up during the read lost its content: the point is discarded, never sent as
        a moment. A snapshot that cannot be made makes the point a live read."""
        self.hooks.pre()
        watchdog = Watchdog([], float(self.request.get("freeze_limit") or FREEZE_LIMIT), self.out.fd, snapshots.lvm)
        try:
            started = time.monotonic()
            try:
                snapshots.take(watchdog)
            except Unavailable as exc:
                return self._live("no LVM snapshot: %s" % exc)
            made = time.monotonic() - started
            self._timed("snapshot", started)
            self.hooks.post()
            snapshots.watch()
            started = time.monotonic()
            try:
                self._first_pass()
            except Fatal:
                self._refuse_overflowed(snapshots)
                raise
            self._timed("first_pass", started)
            self._refuse_overflowed(snapshots)
            return self._record("lvm-snapshot", seconds=round(made, 3),
                                snapshots=[s.describe() for s in snapshots.snapshots])  # fmt: skip
        finally:
            snapshots.remove(watchdog)
            watchdog.close()

    @staticmethod
    def _refuse_overflowed(snapshots):
        full = snapshots.overflowed()
        if full:
            raise Fatal(
                "snapshot-overflow",
                "the LVM snapshot of %s filled up during the read (writes outgrew the volume group's free space);"
                " the point was discarded" % ", ".join(s.origin for s in full),
                volumes=[s.origin for s in full],
            )

    def _record(self, kind, **extra):
        record = {
            "kind": kind,
            "passes": self.passes,
            "reread": self.reread,
            "direct": all(d.direct_fd is not None for d in self.disks if d.kind == "block"),
            "timings": dict((k, round(v, 3)) for k, v in self.timings.items()),
        }
        record.update(extra)
        return record

    def _timed(self, phase, started):
        self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - started

    def _pass(self, dirty):
        """Read again and send the blocks set in `dirty` ({disk index: bitmap}), run by run."""
        for index in sorted(dirty):
            if dirty[index].count(1):
                disk = self.disks[index]
                self.reread[index] += send_runs(disk, read_runs(disk, dirty[index]), self.out)
        self.passes += 1

    def _bytes(self, dirty):
        return sum(bitmap.count(1) * self.disks[i].block_size for i, bitmap in dirty.items())

    def _moment(self, tracer):
        mounts = [m for m in filesystems_on(self.disks) if not m[3]]
        not_frozen = {}
        freezable = []
        for mountpoint, fstype, dev, _ in mounts:
            if fstype in NOT_FREEZABLE:
                not_frozen[mountpoint] = "%s cannot be frozen" % fstype
            elif not _shows(mountpoint, dev):
                not_frozen[mountpoint] = "hidden under another mount"
            else:
                freezable.append(mountpoint)
        started = time.monotonic()
        if self.tracked:  # everything written since the last point: no full read
            self._pass(tracer.mark())
        else:
            tracer.mark()  # what was written before this point began is read by the first pass anyway
            self._first_pass()
        self._timed("first_pass", started)
        started = time.monotonic()
        dirty = tracer.mark()
        converged = self._converge(tracer, dirty)
        self._timed("passes", started)
        if converged is None:
            return self._record("live", missing="the disks were written faster than they could be read again")
        if self._lost(tracer):
            return self._record("live", missing="trace events were lost (the kernel's trace buffer overflowed)")
        self.hooks.pre()  # the application's own quiescing, just before the freeze
        limit = float(self.request.get("freeze_limit") or FREEZE_LIMIT)
        freezer = Watchdog(freezable, limit, self.out.fd) if freezable else None
        try:
            started = time.monotonic()
            os.sync()  # what the file systems hold in memory goes to disk now, not during the freeze
            self._timed("sync", started)
            started = time.monotonic()
            self._pass(_merge(converged, tracer.mark()))
            self._timed("passes", started)
            return self._freeze(tracer, freezer, tracer.mark(), not_frozen)
        finally:
            if freezer is not None:
                freezer.close()

    def _converge(self, tracer, dirty):
        """Pass after pass while the set of blocks written meanwhile shrinks: the set left, or None if the
        disks are written faster than they can be read."""
        previous = None
        while True:
            size = self._bytes(dirty)
            if size <= FREEZE_AT:
                return dirty
            if self.passes >= MAX_PASSES or (previous is not None and size > previous * 0.5):
                return dirty if size <= FREEZE_MAX else None
            self._pass(dirty)
            previous = size
            dirty = tracer.mark()

    def _freeze(self, tracer, freezer, pending, not_frozen):
        problems = []
        for attempt in range(1, FREEZE_TRIES + 1):
            states, held, expired, runs, during = self._frozen_read(tracer, freezer, pending)
            for index in sorted(runs or {}):
                if runs[index]:
                    self.reread[index] += send_runs(self.disks[index], runs[index], self.out)
            if runs:
                self.passes += 1
            why = self._unproven(tracer, expired, runs is None, during)
            if why is None:
                failed = dict((mp, state) for mp, state in states.items() if state not in ("frozen", "already frozen"))
                not_frozen.update(failed)
                frozen = sorted(mp for mp in states if mp not in failed)
                kind = "frozen" if frozen and not not_frozen else "moment"
                return self._record(kind, seconds=round(held, 3), tries=attempt, frozen=frozen, not_frozen=not_frozen)
            failed = [
                "%s: %s" % (mp, state) for mp, state in states.items() if state not in ("frozen", "already frozen")
            ]
            problems.append(why + (" (not frozen: %s)" % ", ".join(failed) if failed else ""))
            if self._lost(tracer):
                break
            pending = during if runs is not None else _merge(pending, during)
        return self._record("live", missing="the moment could not be proven: %s" % "; ".join(problems))

    def _frozen_read(self, tracer, freezer, pending):
        """Freeze, read what was written up to the freeze (its flush included), thaw. Nothing here touches a
        frozen file system: the reads go to the block devices, the marks to tracefs."""
        states = {}
        held, expired = 0.0, False
        started = time.monotonic()
        try:
            if freezer is not None:
                states = freezer.freeze()
            time.sleep(float(self.request.get("pause_frozen") or 0))  # tests: a freeze held on purpose
            pending = _merge(pending, tracer.mark())
            runs = None
            if self._bytes(pending) <= FREEZE_MAX:  # read into memory now, sent after the thaw
                runs = dict((i, list(read_runs(self.disks[i], bitmap))) for i, bitmap in pending.items())
            during = tracer.mark()
        finally:
            if freezer is not None:
                held, expired = freezer.thaw()
            else:
                held = time.monotonic() - started
        return states, held, expired, runs, during

    def _unproven(self, tracer, expired, too_much, during):
        if expired:
            return "the freeze reached its limit of %g s" % float(self.request.get("freeze_limit") or FREEZE_LIMIT)
        if too_much:
            return "more than %d MiB was written up to the freeze" % (FREEZE_MAX >> 20)
        if self._lost(tracer):
            return "trace events were lost (the kernel's trace buffer overflowed)"
        swaps = swap_ranges(self.disks)
        written = 0
        for index, bitmap in during.items():
            for lo, hi in swaps.get(index, ()):
                bitmap[lo : hi + 1] = bytes(len(bitmap[lo : hi + 1]))
            written += bitmap.count(1)
        if written:
            return "%d blocks were written while the file systems were frozen" % written
        return None


def _shows(mountpoint, dev):
    """Whether `mountpoint` still leads to the file system on `dev` (not to another one mounted over it)."""
    try:
        st = os.stat(mountpoint)
    except OSError:
        return False
    return "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev)) == dev or os.major(st.st_dev) == 0


def consistency_plan(request):
    """What a point of these disks will be, for `host add`: (method, why)."""
    try:
        disks = [Disk(i, d["path"], int(d["block_size"])) for i, d in enumerate(request["disks"])]
    except Fatal as exc:
        return "live", str(exc)
    mode = request.get("consistency")
    try:
        if mode == "live":
            return "live", "live reads were asked for"
        untraced = ""
        if mode != "lvm-snapshot":
            try:
                Tracer(disks).close()
                return _traced_plan(disks)
            except Unavailable as exc:
                untraced = str(exc)
        return _snapshot_plan(disks, untraced)
    finally:
        for d in disks:
            d.close()


def _traced_plan(disks):
    mounts = [m for m in filesystems_on(disks) if not m[3]]
    stuck = ["%s (%s)" % (m[0], m[1]) for m in mounts if m[1] in NOT_FREEZABLE]
    if not mounts:
        return "moment", "no file system on the disks is mounted read-write here"
    if stuck:
        return "moment", "cannot be frozen: %s" % ", ".join(stuck)
    return "frozen", "frozen: %s" % ", ".join(m[0] for m in mounts)


def _snapshot_plan(disks, untraced):
    try:
        snapshots = Snapshots(disks).snapshots
    except Unavailable as exc:
        return "live", "; ".join(filter(None, [untraced, "no LVM snapshot: %s" % exc]))
    kinds = ["%s (%s)" % (s.origin, "thin" if s.thin else "thick") for s in snapshots]
    return "lvm-snapshot", "LVM snapshots of %s" % ", ".join(kinds) + (" (%s)" % untraced if untraced else "")


def probe(request, out):
    """Answer what `host add` wants to know, without running hooks or reading data."""
    disks = []
    for d in request["disks"]:
        try:
            fd, size, kind = open_disk(d["path"])
            os.close(fd)
            disks.append({"path": d["path"], "size": size, "kind": kind})
        except Fatal as exc:
            disks.append({"path": d["path"], "size": -1, "kind": "", "error": str(exc), "code": exc.code})
    method, why = consistency_plan(request)
    hello = {
        "protocol": PROTOCOL,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "disks": disks,
        "consistency": {"method": method, "why": why},
    }
    out.send(_json_record(b"H", hello))
    out.send(_json_record(b"F", {"post_hook": None}))
    out.close()


def read_request(stdin):
    """The next request, or None when the appliance closed the session."""
    raw = stdin.read(U32.size)
    if len(raw) != U32.size:
        return None
    return json.loads(stdin.read(U32.unpack(raw)[0]).decode())


def take_point(request, out, stdin, tracking):
    """One point, from the hello to the finished record. Its hooks' post hook runs whatever happens, and
    what it opened is closed (a reader that stays takes many)."""
    hooks = Hooks(request)
    disks = []
    pool = _hash_pool()
    try:
        for i, d in enumerate(request["disks"]):
            disks.append(Disk(i, d["path"], int(d["block_size"])))
        capture = Capture(request, disks, out, OldHashes(stdin), pool, hooks)
        hello = {
            "protocol": PROTOCOL,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "disks": [{"path": d.path, "size": d.size, "kind": d.kind} for d in disks],
            "tracked": capture.prepare(tracking),
            "untracked": capture.untracked,
        }
        out.send(_json_record(b"H", hello))
        moment = capture.run()
        out.send(_json_record(b"M", moment))
        out.send(_json_record(b"F", {"post_hook": hooks.post()}))
    finally:
        if hooks.armed:  # the point ended early: undo the pre hook all the same
            result = hooks.post()
            if result and result["rc"] != 0:
                sys.stderr.write("post hook exited %d: %s\n" % (result["rc"], result["output"]))
        pool.shutdown(wait=False)
        for d in disks:
            d.close()


def main():
    """One point, or, asked to stay ("resident"), one point after another on the same session, tracing
    writes in between, until the appliance closes it."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, _on_signal)
    stdin = sys.stdin.buffer
    out = Output(sys.stdout.fileno())
    tracking = None
    code = 0
    try:
        request = read_request(stdin)
        if request is None:
            raise Hangup("no request")
        if request.get("probe"):
            probe(request, out)
            os._exit(0)
        tracking = Tracking() if request.get("resident") else None
        while request is not None:
            take_point(request, out, stdin, tracking)
            request = read_request(stdin) if tracking is not None else None
        out.close()
    except Fatal as exc:
        code = 3
        try:
            err = {"code": exc.code, "message": str(exc)}
            err.update(exc.extra)
            out.send(_json_record(b"X", err))
            out.close()
        except Hangup:
            pass
    except (Hangup, BrokenPipeError):
        code = 4
    finally:
        if tracking is not None:
            tracking.close()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
