# SPDX-License-Identifier: GPL-2.0-or-later
"""The reader that runs on a protected host for one capture: standard library only, Python 3.6+.

It is not installed on the host: the appliance sends this file over the SSH session's stdin for every
run (see `BOOTSTRAP`), so the host needs nothing but sshd and python3, and the reader always matches
the appliance's version.

What it does, for each disk in turn: read it once, cut it into fixed-size blocks, hash each block
(sha256), compare with the previous point's hash that the appliance streams in on stdin, and send only
the blocks that differ. A block of zeroes is never sent: it is a one-line "zero" record when it used to
hold data, and nothing at all when it was zero already. The digest of the whole disk (sha256 over the
block hashes) goes with the end of each disk, so the appliance can prove what it stored.

Wire format (all integers little-endian). Appliance -> host, after the code itself:
  request     u32 length + JSON  {"disks": [{"path", "block_size"}], "pre_hook": [argv], "post_hook": [argv]}
  old hashes  per disk, after the host's hello, runs covering every block of the disk as it is now:
              u8 kind + u32 count; kind 1 (HASH) is followed by count x 16-byte hash prefixes;
              kind 0 (ZERO) and 2 (UNKNOWN) carry nothing
Host -> appliance, one record after another, each starting with a one-byte type:
  H u32+JSON  hello: python version and each disk's path, size and kind
  D u64 block, u32 length, then 32-byte hash of each block, then the block bytes (consecutive blocks)
  Z u64 block, u32 count: blocks that now read as zeroes
  P u64       bytes read so far on the current disk
  E u64 bytes read, 32-byte digest: end of the current disk
  F u32+JSON  finished: what the post hook did
  X u32+JSON  fatal error: {"code", "message", ...}; nothing after it
Within a disk, D and Z records come in increasing block order and never overlap, a D record carries 1 to
MAX_RUN bytes and only the disk's last block may be short, P grows, E carries the disk's size. The
appliance refuses anything else as a protocol violation (appliance.transfer.protocol): keep them in step.
"""

import collections
import hashlib
import json
import os
import queue
import signal
import stat
import struct
import subprocess
import sys
import threading

PROTOCOL = 1
PREFIX_LEN = 16  # bytes of each old block hash sent to the host: 128 bits, collision-safe, half the upload
HASH_LEN = 32
CHUNK = 4 << 20  # bytes read at once; a multiple of every block size the appliance uses
MAX_RUN = 1 << 20  # bytes of consecutive changed blocks sent in one D record
PROGRESS_EVERY = 64 << 20
HOOK_TIMEOUT = 600

OLD_ZERO, OLD_HASH, OLD_UNKNOWN = 0, 1, 2
RUN = struct.Struct("<BI")
U32 = struct.Struct("<I")
DATA = struct.Struct("<cQI")
ZERO = struct.Struct("<cQI")
PROGRESS = struct.Struct("<cQ")
END = struct.Struct("<cQ")

# The one fixed command line the appliance runs: it reads this file from stdin and executes it.
BOOTSTRAP = 'import sys;exec(compile(sys.stdin.buffer.read(int(sys.argv[1])),"appliance-reader","exec"))'


class Fatal(Exception):
    def __init__(self, code, message, **extra):
        Exception.__init__(self, message)
        self.code = code
        self.extra = extra


class Hangup(Exception):
    """The session ended (SIGHUP/SIGTERM/SIGPIPE): stop reading, but still run the post hook."""


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


class OldHashes:
    """Reads the appliance's stream of previous block hashes, block by block, as the disk is read."""

    def __init__(self, stream):
        self.stream = stream
        self.kind = None
        self.left = 0

    def _read(self, n):
        data = self.stream.read(n)
        if len(data) != n:
            raise Hangup("appliance closed the connection")
        return data

    def take(self, count):
        """Return (all_zero, entries) for the next `count` blocks; entries[i] is None, a prefix, or b''."""
        entries = []
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


def _json_record(tag, obj):
    body = json.dumps(obj).encode()
    return tag + U32.pack(len(body)) + body


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
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
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


def chunks(fd, size):
    """Yield (offset, buffer) of the disk, read ahead by a thread so that I/O overlaps hashing."""
    q = queue.Queue(maxsize=4)

    holes = _HoleFinder(fd, size)

    def reader():
        offset = 0
        try:
            while offset < size:
                want = min(CHUNK, size - offset)
                if want == CHUNK and holes.is_hole(offset, want):
                    q.put((offset, ZERO_CHUNK))  # a hole of a sparse image file reads as zeroes: skip the read
                    offset += want
                    continue
                # pread into a new bytes object: no zero-filling of a fresh buffer, and glibc reuses the
                # freed chunks, so there are no page faults either (bytearray(want) cost a third of the time)
                buf = os.pread(fd, want, offset)
                while len(buf) < want:
                    more = os.pread(fd, want - len(buf), offset + len(buf))
                    if not more:
                        raise Fatal("disk-changed", "disk ended at %d bytes, expected %d" % (offset + len(buf), size))
                    buf += more
                q.put((offset, buf))
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


def send_disk(fd, size, block_size, old, out, pool):
    """Read one disk, send what changed, return (bytes read, digest).

    Chunks are hashed by a pool of threads, a few chunks ahead, and compared in order here.
    """
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

    for offset, buf in chunks(fd, size):
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
    out.send(_json_record(b"H", {"protocol": PROTOCOL, "python": "%d.%d.%d" % sys.version_info[:3], "disks": disks}))
    out.send(_json_record(b"F", {"post_hook": None}))
    out.close()


def main():
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, _on_signal)
    stdin = sys.stdin.buffer
    out = Output(sys.stdout.fileno())
    post_hook = None
    code = 0
    try:
        raw = stdin.read(U32.size)
        if len(raw) != U32.size:
            raise Hangup("no request")
        request = json.loads(stdin.read(U32.unpack(raw)[0]).decode())
        if request.get("probe"):
            probe(request, out)
            os._exit(0)
        pre = run_hook(request.get("pre_hook"), "pre")
        if pre is not None and pre["rc"] != 0:
            raise Fatal("pre-hook-failed", "pre hook exited %d: %s" % (pre["rc"], pre["output"].strip()[-300:]))
        # From here on the post hook undoes what the pre hook did, whatever happens. Not before: after a
        # failed (or interrupted) `fsfreeze -f` it would thaw a freeze that belongs to someone else.
        post_hook = request.get("post_hook") or None
        disks = []
        for d in request["disks"]:
            fd, size, kind = open_disk(d["path"])
            disks.append((fd, size, kind, d))
        hello = {
            "protocol": PROTOCOL,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "disks": [{"path": d["path"], "size": size, "kind": kind} for fd, size, kind, d in disks],
        }
        out.send(_json_record(b"H", hello))
        old = OldHashes(stdin)
        pool = _hash_pool()
        for fd, size, _, d in disks:
            read, digest = send_disk(fd, size, int(d["block_size"]), old, out, pool)
            out.send(END.pack(b"E", read), digest)
        post, post_hook = run_hook(post_hook, "post"), None
        out.send(_json_record(b"F", {"post_hook": post}))
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
        if post_hook:
            result = run_hook(post_hook, "post")
            if result and result["rc"] != 0:
                sys.stderr.write("post hook exited %d: %s\n" % (result["rc"], result["output"]))
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
