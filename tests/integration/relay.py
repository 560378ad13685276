# SPDX-License-Identifier: GPL-2.0-or-later
"""A TCP relay between a DR appliance and its source site that can cut the link at a chosen byte.

The tests' own, since netem (which could drop a link) is missing on some kernels: the DR site connects to
127.0.0.1:port, the relay connects on to the site's sshd and copies both ways, counting what the source
sends. `cut_after(n)` closes every connection once n more bytes came from the source (the session dies
as on a link that drops: the DR side sees its connection break mid-record); later connections pass.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CuttingRelay:
    def __init__(self, target: tuple[str, int], delay_per_chunk: float = 0.0) -> None:
        self.target = target
        self.delay = delay_per_chunk  # a slow link: seconds slept per chunk the source sends
        self.downstream = 0  # bytes from the source, all connections
        self._cut_at: int | None = None
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, n: int | None) -> None:
        """Cut every connection once `n` more bytes came from the source (None: never)."""
        with self._lock:
            self._cut_at = None if n is None else self.downstream + n

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_source: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_source:
                    if self.delay:
                        time.sleep(self.delay)
                    with self._lock:
                        if self._cut_at is not None and self.downstream + len(data) >= self._cut_at:
                            data = data[: max(self._cut_at - self.downstream, 0)]
                            self.downstream += len(data)
                            dst.sendall(data)
                            self._cut_at = None
                            self._close_all()
                            return
                        self.downstream += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _close_all(self) -> None:
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._open = []

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            self._close_all()
