# SPDX-License-Identifier: GPL-2.0-or-later
"""LocalShell: the RemoteShell port without the network (borg's `__testsuite__` remote).

The command a use case starts on a "host" runs here, as a local process over pipes: for a backup that
is the real reader (appliance/agent/reader.py, started by its BOOTSTRAP command line and sent over
stdin), so the wire protocol is the real one and only SSH is left out. A protected host's disks are
plain files in the test's tmp_path.

`cut_after = n` breaks the next streams after n bytes received: the read that crosses it returns what
came before the cut, and every call after it raises ConnectionLostError, as a dropped link does; the
process on the "host" sees its pipes closed, as sshd closes them.

`LocalShell(commands={argv: run})` maps a command line to a Python function run in a thread instead of a
process: `run(stdin, stdout)` gets buffered binary files over os.pipe() pairs (as sys.stdin.buffer and
sys.stdout.buffer) and returns the exit status. That is how an appliance's forced command is reached
without its CLI (which wires the real QEMU adapters): a DR site's `session.start(["serve-replica"])`
mapped to `lambda i, o: replica_source.serve(source_home, source_tools, i, o, "dr1")`. An exception
it raises is its stderr's last line and exit status 1; a cut closes its pipes as for a process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import BinaryIO

from appliance.domain.models import Host, HostKey
from appliance.errors import ConnectionLostError, HostKeyError, JobDeadlineError

HOST_KEY = HostKey(
    key_type="ssh-ed25519",
    base64="AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyOfTheLocalShellForUnitTestsOnly0",
    fingerprint="SHA256:LocalShellFakeHostKeyFingerprintForUnitTests00",
)
RECV_SIZE = 1 << 20

# A command run in a thread (see the module doc): (stdin, stdout) -> exit status.
Command = Callable[[BinaryIO, BinaryIO], int]


class _InThread:
    """What LocalStream needs of a subprocess.Popen, for a Command run in a thread over pipes."""

    def __init__(self, run: Command) -> None:
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, self._stderr_w = os.pipe()
        # the ends LocalStream holds, unbuffered as Popen's with bufsize=0; closed by LocalStream
        self.stdin = open(stdin_w, "wb", 0)  # noqa: SIM115
        self.stdout = open(stdout_r, "rb", 0)  # noqa: SIM115
        self.stderr = open(stderr_r, "rb", 0)  # noqa: SIM115
        self.returncode: int | None = None
        self._thread = threading.Thread(target=self._main, args=(run, stdin_r, stdout_w), daemon=True)
        self._thread.start()

    def _main(self, run: Command, stdin_fd: int, stdout_fd: int) -> None:
        status = 1
        try:
            with open(stdin_fd, "rb") as stdin, open(stdout_fd, "wb") as stdout:
                try:
                    status = run(stdin, stdout)
                finally:
                    with contextlib.suppress(BrokenPipeError):
                        stdout.flush()
        except BrokenPipeError:
            status = 4
        except BaseException:
            os.write(self._stderr_w, traceback.format_exc().encode())
        finally:
            os.close(self._stderr_w)
            self.returncode = status

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("in-thread command", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """A thread cannot be killed: its pipes are closed already, which ends any read or write of it."""


class LocalStream:
    """One command running locally: the RemoteStream port."""

    def __init__(self, argv: Sequence[str], cut_after: int | None, run: Command | None = None) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.cut_after = cut_after
        self.cut = False
        self.deadline: float | None = None
        self._gone = False  # the link is down: no read or write touches the pipes again
        self._stdin_lock = threading.Lock()  # a write in another thread never meets a closed (reused) fd
        self._proc: subprocess.Popen[bytes] | _InThread = (
            _InThread(run)
            if run is not None
            else subprocess.Popen(
                list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
            )
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
        stream = LocalStream(argv, self.shell.cut_after, self.shell.commands.get(tuple(argv)))
        self.streams.append(stream)
        return stream


class LocalShell:
    """The RemoteShell port: every host is this machine, reached with the fixed key HOST_KEY. `commands`:
    command lines run as Python functions in a thread (see the module doc)."""

    def __init__(self, commands: Mapping[tuple[str, ...], Command] | None = None) -> None:
        self.cut_after: int | None = None
        self.commands: dict[tuple[str, ...], Command] = dict(commands or {})

    def connect(self, host: Host) -> LocalSession:
        if host.host_key != HOST_KEY:
            raise HostKeyError(f"HOST KEY CHANGED for {host.address}: pinned {host.host_key.fingerprint}")
        return LocalSession(self)

    def scan_host_key(self, address: str, port: int) -> HostKey:
        return HOST_KEY
