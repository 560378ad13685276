# SPDX-License-Identifier: GPL-2.0-or-later
"""A cloud point's disk as a failover reads it: from a local cache, blocks fetched from the bucket on first
read, and the rest streamed in behind by a background thread, pack by pack (appliance/nbdkit_plugin.py
serves this to QEMU).

The cache is a sparse file the disk's size, and a map of the blocks it holds (one byte a block, written
whole and renamed into place every few seconds and at the end): an NBD server started again for the same
VM finds what was fetched. A read the guest makes waits only for its own blocks and READ_AHEAD after
them (a boot reads files in order). The guest comes first: while its reads miss the cache the stream
pauses (a slow link is then all the guest's), and the stream fetches only STREAM_SPAN at a time.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from appliance.domain.cloud import ZERO
from appliance.log import get_logger
from appliance.services.cloud_reader import DiskReader

log = get_logger(__name__)

READ_AHEAD = 32  # blocks fetched past a read that missed the cache (1 MiB of 32 KiB blocks)
MAP_EVERY = 5.0  # seconds between writes of the cache's map
STREAM_SPAN = 2 << 20  # bytes the stream fetches at once: a guest's read never waits long behind one
DEMAND_QUIET = 1.0  # the stream pauses until the guest's reads have missed the cache for this long


class CachedDisk:
    def __init__(self, reader: DiskReader, cache: Path) -> None:
        self.reader = reader
        self.size = reader.disk.size
        self.block_size = reader.disk.block_size
        self.cache_path, self.map_path = cache, cache.with_suffix(".map")
        fd = os.open(cache, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, self.size)
        self.fd = fd
        self.held = self._load_map()
        self._lock = threading.Lock()
        self._map_written = time.monotonic()
        self.streamed = threading.Event()
        self.stopping = threading.Event()
        self.fetched_on_read = 0  # blocks a read waited for
        self._last_miss = 0.0  # time.monotonic() of the guest's last read that missed the cache

    def _load_map(self) -> bytearray:
        total = self.reader.total
        try:
            held = bytearray(self.map_path.read_bytes())
        except OSError:
            held = bytearray(total)
        if len(held) != total:
            held = bytearray(total)
        for b in range(total):  # a block that reads as zeroes needs nothing from the bucket
            if self.reader.map.packs[b] == ZERO:
                held[b] = 1
        return held

    def read(self, offset: int, length: int) -> bytes:
        first, last = offset // self.block_size, (offset + length - 1) // self.block_size
        missing = [b for b in range(first, last + 1) if not self.held[b]]
        if missing:
            self._last_miss = time.monotonic()
            end = min(self.reader.total, last + 1 + READ_AHEAD)
            ahead = [b for b in range(last + 1, end) if not self.held[b]]
            self._fetch(missing[0], (ahead or missing)[-1] - missing[0] + 1)
            self.fetched_on_read += len(missing)
        return os.pread(self.fd, length, offset)

    def _fetch(self, first: int, count: int) -> None:
        for b, data in self.reader.blocks(first, count):
            if not self.held[b]:
                os.pwrite(self.fd, data, b * self.block_size)
                self.held[b] = 1
        self._maybe_write_map()

    def stream(self) -> None:
        """Fetch every block not yet held, in the order the packs hold them (the background thread)."""
        started = time.monotonic()
        span = max(1, STREAM_SPAN // self.block_size)
        try:
            for first, count, _pack, _entry in self.reader.map.stretches():
                for start in range(first, first + count, span):
                    while time.monotonic() - self._last_miss < DEMAND_QUIET and not self.stopping.is_set():
                        time.sleep(0.05)
                    if self.stopping.is_set():
                        return
                    n = min(span, first + count - start)
                    if not all(self.held[start : start + n]):
                        self._fetch(start, n)
            self.write_map()
            self.streamed.set()
            log.info("cloud_cache.streamed", seconds=round(time.monotonic() - started, 1),
                     fetched=self.reader.fetched_bytes, on_read=self.fetched_on_read)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a read of the guest retries what the stream could not get
            log.error("cloud_cache.stream_failed", error=str(exc))

    def _maybe_write_map(self) -> None:
        if time.monotonic() - self._map_written >= MAP_EVERY:
            self.write_map()

    def write_map(self) -> None:
        with self._lock:
            os.fsync(self.fd)
            tmp = self.map_path.with_suffix(".map.tmp")
            tmp.write_bytes(bytes(self.held))
            os.replace(tmp, self.map_path)
            self._map_written = time.monotonic()

    def close(self) -> None:
        self.stopping.set()
        self.write_map()
        os.close(self.fd)
