# SPDX-License-Identifier: GPL-2.0-or-later
"""LocalShell: the RemoteShell port without the network (borg's `__testsuite__` remote).

The command a use case starts on a "host" runs here, as a local process over pipes: for a backup that
is the real reader (appliance/agent/reader.py, started by its BOOTSTRAP command line and sent over
stdin), so the wire protocol is the real one and only SSH is left out. A protected host's disks are
plain files in the test's tmp_path.

`cut_after = n` breaks the next streams after n bytes received: the read that crosses it returns what
came before the cut, and every call after it raises ConnectionLostError, as a dropped link does; the
process on the "host" sees its pipes closed, as sshd closes them.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType

from appliance.domain.models import Host, HostKey
from appliance.errors import ConnectionLostError, HostKeyError, JobDeadlineError

HOST_KEY = HostKey(
    key_type="ssh-ed25519",
    base64="AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyOfTheLocalShellForUnitTestsOnly0",
    fingerprint="SHA256:LocalShellFakeHostKeyFingerprintForUnitTests00",
)
RECV_SIZE = 1 << 20


class LocalStream:
    """One command running locally: the RemoteStream port."""

    def __init__(self, argv: Sequence[str], cut_after: int | None) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.cut_after = cut_after
        self.cut = False
        self.deadline: float | None = None
        self._gone = False  # the link is down: no read or write touches the pipes again
        self._stdin_lock = threading.Lock()  # a write in another thread never meets a closed (reused) fd
        self._proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        self._stderr = bytearray()
        self._stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_reader.start()

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        while chunk := self._proc.stderr.read(65536):
            self._stderr += chunk

    @staticmethod
    def _lost(why: object = "cut by the test") -> ConnectionLostError:
        return ConnectionLostError(f"the connection to the local host broke: {why}")

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._stdin_lock:
            if self._gone:
                raise self._lost()
            assert self._proc.stdin is not None
            try:
                while view:
                    view = view[os.write(self._proc.stdin.fileno(), view) :]
            except OSError as exc:
                raise self._lost(exc) from exc
        self.bytes_sent += len(data)

    def close_stdin(self) -> None:
        with self._stdin_lock:
            assert self._proc.stdin is not None
            self._proc.stdin.close()

    def set_deadline(self, at: float | None) -> None:
        self.deadline = at

    def recv_some(self) -> bytes:
        if self._gone:
            raise self._lost()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise JobDeadlineError("the job on the local host passed its deadline")
        assert self._proc.stdout is not None
        try:
            data = os.read(self._proc.stdout.fileno(), RECV_SIZE)
        except OSError as exc:
            raise self._lost(exc) from exc
        if self.cut_after is not None and self.bytes_received + len(data) >= self.cut_after:
            data = data[: self.cut_after - self.bytes_received]
            self.cut = True
            self.hang_up()
            if not data:
                raise self._lost()
        self.bytes_received += len(data)
        return data

    def stderr_text(self) -> str:
        return bytes(self._stderr).decode(errors="replace")

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status; -1 when none came (the link was cut, or the command still runs)."""
        if self.cut:
            return -1
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return -1
        self._stderr_reader.join(timeout)
        return status

    def ended(self) -> bool:
        return self._proc.poll() is not None

    def abort(self) -> None:
        self.hang_up()

    def hang_up(self) -> None:
        """What the command sees when its SSH session goes: sshd closes the pipes (EPIPE on its output,
        end of file on its input), and the reader stops as it would on the host."""
        if self._gone:
            return
        self._gone = True
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdout.close()
        with self._stdin_lock:  # a write blocked on a full pipe returns once the command reads or ends
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        self.hang_up()
        self._stderr_reader.join(10)
        assert self._proc.stderr is not None
        self._proc.stderr.close()


class LocalSession:
    """The RemoteSession port: every command started in it ends with it."""

    def __init__(self, shell: LocalShell) -> None:
        self.shell = shell
        self.streams: list[LocalStream] = []

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for stream in self.streams:
            stream.close()

    def start(self, argv: Sequence[str]) -> LocalStream:
        stream = LocalStream(argv, self.shell.cut_after)
        self.streams.append(stream)
        return stream


class LocalShell:
    """The RemoteShell port: every host is this machine, reached with the fixed key HOST_KEY."""

    def __init__(self) -> None:
        self.cut_after: int | None = None

    def connect(self, host: Host) -> LocalSession:
        if host.host_key != HOST_KEY:
            raise HostKeyError(f"HOST KEY CHANGED for {host.address}: pinned {host.host_key.fingerprint}")
        return LocalSession(self)

    def scan_host_key(self, address: str, port: int) -> HostKey:
        return HOST_KEY
