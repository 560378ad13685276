# SPDX-License-Identifier: GPL-2.0-or-later
"""Readers kept running on their hosts between points, so a point reads only what was written since the last.

The daemon keeps one SSH session per host open after each backup, with its reader still in memory and the
kernel's trace of the disks' writes still running (nothing is installed on the host). The next point of
that host asks that reader for the blocks written since the point it took last, instead of reading and
hashing every block. The reader says no, and reads everything, whenever there is a doubt; the appliance
asks only when its newest point is the one that reader took.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from dataclasses import dataclass, field

from appliance.domain.models import Host
from appliance.log import get_logger
from appliance.ports import RemoteStream, Tools
from appliance.services.reader_session import start_reader

log = get_logger(__name__)


@dataclass
class KeptReader:
    """A reader on one host, and the SSH connection it runs in."""

    host: Host  # the settings it was started with: another setting, another reader
    stream: RemoteStream
    connection: ExitStack = field(default_factory=ExitStack)
    token: str = ""  # the reader's name for the point it took last
    point_id: str | None = None  # that point's id, once the appliance recorded it

    def tracks_from(self, newest: str | None) -> str | None:
        """The token to ask for a tracked point with, if the chain's newest point is this reader's own."""
        return self.token if self.token and newest is not None and newest == self.point_id else None

    def close(self) -> None:
        self.stream.abort()
        self.connection.close()


def start(tools: Tools, host: Host) -> KeptReader:
    """A new SSH connection with a reader started in it."""
    with ExitStack() as stack:
        session = stack.enter_context(tools.remote.connect(host))
        stream = start_reader(session, host)
        return KeptReader(host, stream, stack.pop_all())


class ReaderPool:
    """The kept readers, one per host; thread-safe (the daemon runs hosts side by side)."""

    def __init__(self) -> None:
        self._kept: dict[str, KeptReader] = {}
        self._lock = threading.Lock()

    def take(self, host: Host) -> KeptReader | None:
        """The host's kept reader, if it is still there and was started with the host's current settings."""
        with self._lock:
            kept = self._kept.pop(host.name, None)
        if kept is None:
            return None
        if kept.host != host or kept.stream.ended():
            log.info("reader_pool.dropped", host=host.name,
                     reason="settings changed" if kept.host != host else "the reader or its session ended")  # fmt: skip
            kept.close()
            return None
        return kept

    def keep(self, kept: KeptReader) -> None:
        kept.stream.set_deadline(None)
        with self._lock:
            old = self._kept.pop(kept.host.name, None)
            self._kept[kept.host.name] = kept
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._lock:
            kept, self._kept = list(self._kept.values()), {}
        for k in kept:
            k.close()
