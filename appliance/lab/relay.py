# SPDX-License-Identifier: GPL-2.0-or-later
"""A TCP relay to put between a DR appliance and its source site: a WAN's delay, a slow link, a link that
drops at a chosen byte.

`netem`, which could do the same in the kernel, is missing on some kernels, so the lab has its own: the
DR site connects to 127.0.0.1:port, the relay connects on to the target (the source site's sshd) and
copies both ways:
- `one_way`: each byte held that long in each direction (a round-trip time of twice that);
- `per_chunk`: seconds slept for each chunk the source sends (a slow link, without tc);
- `cut_after(n)`: the connection closed once n more bytes came from the source: the DR side gets exactly
  those n, then the end of the stream (its session breaks in the middle of a record, and a test knows
  what arrived); the source's side is closed at once. Later connections pass.
`downstream` counts the bytes that came from the source, all connections together.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

_CUT = None  # in a connection's queue: close it both ways


class Relay:
    def __init__(self, target: tuple[str, int], one_way: float = 0.0, per_chunk: float = 0.0) -> None:
        self.target, self.one_way, self.per_chunk = target, one_way, per_chunk
        self.downstream = 0
        self._cut_at: int | None = None
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, n: int | None) -> None:
        """Cut the connection once `n` more bytes came from the source (None: never)."""
        with self._lock:
            self._cut_at = None if n is None else self.downstream + n

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            both = (client, upstream)
            for src, dst, from_source in ((client, upstream, False), (upstream, client, True)):
                pending: queue.Queue[tuple[float, bytes | None]] = queue.Queue()
                threading.Thread(target=self._read, args=(src, pending, from_source), daemon=True).start()
                threading.Thread(target=self._send, args=(dst, pending, both), daemon=True).start()

    def _read(self, src: socket.socket, pending: queue.Queue[tuple[float, bytes | None]], from_source: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                cut = False
                if from_source:
                    if self.per_chunk:
                        time.sleep(self.per_chunk)
                    data, cut = self._counted(data)
                pending.put((time.monotonic() + self.one_way, data))
                if cut:
                    pending.put((time.monotonic() + self.one_way, _CUT))
                    return
        pending.put((time.monotonic() + self.one_way, b""))

    def _counted(self, data: bytes) -> tuple[bytes, bool]:
        """`data` up to the cut, if it falls in it, and whether it did."""
        with self._lock:
            cut = self._cut_at is not None and self.downstream + len(data) >= self._cut_at
            if cut:
                assert self._cut_at is not None
                data = data[: self._cut_at - self.downstream]
                self._cut_at = None
            self.downstream += len(data)
            return data, cut

    def _send(self, dst: socket.socket, pending: queue.Queue[tuple[float, bytes | None]],
              both: tuple[socket.socket, socket.socket]) -> None:  # fmt: skip
        while True:
            due, data = pending.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if data is _CUT:  # what came before the cut is delivered, then the end: no reset
                    dst.shutdown(socket.SHUT_WR)
                    with contextlib.suppress(OSError):
                        both[1].shutdown(socket.SHUT_RDWR)  # the source's side
                    return
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return
