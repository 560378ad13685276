# SPDX-License-Identifier: GPL-2.0-or-later
"""One job per host at a time: an exclusive flock on the host's lock file.

The kernel drops a flock when its holder dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

from appliance.errors import ChainLockedError


class HostLock:
    def __init__(self, path: Path, host: str, purpose: str, wait: float = 0.0) -> None:
        self.path = path
        self.host = host
        self.purpose = purpose
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> HostLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise ChainLockedError(
                        f"{self.host} is busy: {holder}; not starting {self.purpose}",
                        hint="wait for it to finish; the lock is released the moment that job ends",
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "job": self.purpose, "since": time.time()}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            info = None
        if not isinstance(info, dict):  # the holder is only being named: damage here must not hide the refusal
            return "another job is running"
        return f"{info.get('job', 'another job')} (pid {info.get('pid', '?')}) is running"
