# SPDX-License-Identifier: GPL-2.0-or-later
"""The contracts between use cases and the external systems they need.

Services depend on these Protocols only; `appliance.bootstrap` hands them the real adapters
(paramiko, qemu-img, qemu-storage-daemon), and unit tests may hand them fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appliance.domain.models import Host, HostKey


class RemoteStream(Protocol):
    """A command running on a host. Every method raises ConnectionLostError when the link breaks."""

    bytes_sent: int
    bytes_received: int

    def write(self, data: bytes | memoryview) -> None: ...
    def close_stdin(self) -> None: ...
    def recv_some(self) -> bytes: ...
    def stderr_text(self) -> str: ...
    def wait(self, timeout: float = 30.0) -> int: ...
    def abort(self) -> None: ...


class RemoteSession(Protocol):
    def start(self, argv: Sequence[str]) -> RemoteStream: ...


class RemoteShell(Protocol):
    """Authenticated SSH to protected hosts, with the host's pinned key only.

    :raises HostUnreachableError, AuthenticationError, HostKeyError, ConfigError (unreadable key):
    """

    def connect(self, host: Host) -> AbstractContextManager[RemoteSession]: ...
    def scan_host_key(self, address: str, port: int) -> HostKey: ...


class ExportedImage(Protocol):
    """A qcow2 image (through its backing chain) seen as a plain file at `path`."""

    path: Path


class ImageTool(Protocol):
    """qemu-img and qemu-storage-daemon.

    :raises ImageToolError, ChainCorruptError, StoreFullError:
    """

    def create(self, path: Path, size: int, backing: str | None = None, cluster_size: int = 65536) -> None: ...
    def info_chain(self, path: Path) -> list[dict[str, Any]]: ...
    def check(self, path: Path) -> dict[str, Any]: ...
    def map_zero_extents(self, path: Path) -> list[tuple[int, int]]: ...
    def export(self, image: Path, run_dir: Path, *, writable: bool) -> AbstractContextManager[ExportedImage]: ...
    def zero_range(self, fd: int, offset: int, length: int) -> None: ...
    def unmount_stale(self, path: Path) -> None: ...


@dataclass(frozen=True, slots=True)
class Tools:
    """What the use cases are given to reach the outside world."""

    remote: RemoteShell
    images: ImageTool
