# SPDX-License-Identifier: GPL-2.0-or-later
"""The contracts between use cases and the external systems they need.

Services depend on these Protocols only; `appliance.bootstrap` hands them the real adapters
(paramiko, qemu-img, qemu-storage-daemon), and unit tests may hand them fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from appliance.domain.accel import Machine
from appliance.domain.alerts import Channel, Message
from appliance.domain.models import Host, HostKey
from appliance.domain.recovery import DomainSpec, DomainState


class RemoteStream(Protocol):
    """A command running on a host. Every method raises ConnectionLostError when the link breaks or goes
    silent for the host's timeout, and JobDeadlineError once the deadline (`set_deadline`) has passed:
    a host that trickles a byte now and then never holds a job beyond it."""

    bytes_sent: int
    bytes_received: int

    def write(self, data: bytes | memoryview) -> None: ...
    def close_stdin(self) -> None: ...
    def recv_some(self) -> bytes: ...
    def stderr_text(self) -> str: ...
    def wait(self, timeout: float = 30.0) -> int: ...
    def abort(self) -> None: ...
    def ended(self) -> bool: ...  # the command exited or its channel closed (a kept reader that died while idle)
    def set_deadline(self, at: float | None) -> None: ...  # time.monotonic() value; None: no deadline


class RemoteSession(Protocol):
    def start(self, argv: Sequence[str]) -> RemoteStream: ...


class RemoteShell(Protocol):
    """Authenticated SSH to protected hosts, with the host's pinned key only.

    :raises HostUnreachableError, AuthenticationError, HostKeyError, ConfigError (unreadable key):
    """

    def connect(self, host: Host) -> AbstractContextManager[RemoteSession]: ...
    def scan_host_key(self, address: str, port: int) -> HostKey: ...


class ExportedImage(Protocol):
    """A qcow2 image (through its backing chain unless asked otherwise), open for reading or writing.

    :raises StoreFullError: the appliance's disk is full (write, zero, flush).
    :raises ImageToolError: any other failure of the image.
    """

    def read(self, offset: int, length: int) -> bytes: ...  # exactly `length` bytes
    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...  # reads as zeroes (a zero cluster, never a hole)
    def flush(self) -> None: ...  # durable on the appliance's disk


class ImageTool(Protocol):
    """qemu-img and qemu-storage-daemon.

    :raises ImageToolError, ChainCorruptError, StoreFullError:
    """

    def create(self, path: Path, size: int, backing: str | None = None, cluster_size: int = 65536,
               backing_format: str = "qcow2") -> None: ...  # fmt: skip
    def info_chain(self, path: Path) -> list[dict[str, Any]]: ...
    def check(self, path: Path) -> dict[str, Any]: ...
    def map_zero_extents(self, path: Path) -> list[tuple[int, int]]: ...
    def commit(self, top: Path) -> None: ...
    def resize(self, path: Path, size: int) -> None: ...
    def flatten(self, image: Path, target: Path) -> None: ...  # a standalone qcow2 of what `image` reads as
    def virtual_size(self, path: Path) -> int: ...
    def export(
        self, image: Path, run_dir: Path, *, writable: bool, backing: bool = True
    ) -> AbstractContextManager[ExportedImage]: ...
    def own_extents(self, path: Path) -> list[tuple[int, int, bool]]: ...
    def copy_dirty(self, image: Path, bitmaps: list[str], target: Path, run_dir: Path) -> None: ...
    def unmount_stale(self, path: Path) -> None: ...


class Hypervisor(Protocol):
    """Recovery VMs through libvirt. Connects on first use.

    :raises HypervisorError: libvirt is not running, or refused or failed an operation.
    """

    uri: str

    def kvm_available(self) -> bool: ...
    def machine(self) -> Machine: ...
    def exists(self, name: str) -> bool: ...
    def start(self, spec: DomainSpec) -> None:
        """Define and start; a shut-off domain of that name is redefined in place."""

    def state(self, name: str) -> DomainState: ...
    def remove(self, name: str) -> None: ...
    def shutdown(self, name: str) -> None: ...
    def vnc_display(self, name: str) -> str: ...
    def guest_addresses(self, name: str) -> list[str]: ...
    def destroy_keep(self, name: str) -> None: ...
    def drop_checkpoints(self, name: str, only: list[str] | None = None) -> None: ...
    def backup(self, name: str, targets: list[tuple[str, Path]], checkpoint: str, since: str | None) -> None: ...
    def screenshot_ppm(self, name: str, path: Path) -> bytes: ...
    def screenshot_png(self, name: str, path: Path) -> None: ...
    def qemu_log_tail(self, name: str, lines: int = 5) -> str: ...
    def free_memory_mib(self) -> int: ...
    def bridge_exists(self, name: str) -> bool: ...
    def recovery_domains(self) -> list[tuple[str, dict[str, str]]]: ...


@dataclass(frozen=True, slots=True)
class BucketAccess:
    """Where a cloud store's bucket is and the credentials for it (the secret never in a repr or a log)."""

    endpoint: str
    bucket: str
    region: str
    access_key: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ObjectLock:
    mode: str  # "COMPLIANCE" or "GOVERNANCE"
    until: datetime


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    version: str | None  # the newest version that is not a deletion (None: a bucket without versioning)
    size: int
    modified: datetime
    hidden: bool = False  # the key's newest entry is a delete marker: a version the appliance reads is behind it


class ObjectStorage(Protocol):
    """One S3 bucket. Errors are CloudAccessError (credentials, endpoint, bucket), CloudObjectError (a key
    or version missing), CloudFullError, CloudLockError (a lock refused), or CloudError.

    `requests` counts each request made, by operation (benchmarks report it: S3 bills per request)."""

    requests: dict[str, int]

    def put(self, key: str, data: bytes, lock: ObjectLock | None = None) -> str | None: ...  # -> version id
    def get(self, key: str, version: str | None = None, start: int = 0, end: int | None = None) -> bytes: ...
    def get_tail(self, key: str, version: str | None, length: int) -> bytes: ...
    def listing(self, prefix: str) -> list[StoredObject]: ...
    def versions(self, key: str) -> list[str]: ...  # every version of the key, deletions' markers included
    def delete(self, key: str, version: str | None) -> None: ...
    def lock_of(self, key: str, version: str | None) -> ObjectLock | None: ...
    def extend_lock(self, key: str, version: str | None, lock: ObjectLock) -> None: ...
    def abort_uploads(self) -> int: ...  # multipart uploads left by a cut upload: aborted; returns how many


class BlockServer(Protocol):
    """An NBD server (nbdkit) serving one disk of a cloud point to QEMU over a Unix socket. It runs in a
    process of its own that outlives the command that started it (the recovery VM reads through it)."""

    def start(self, socket: Path, pidfile: Path, log_file: Path, params: dict[str, str]) -> None: ...
    def stop(self, pidfile: Path) -> None: ...
    def running(self, pidfile: Path) -> bool: ...


class Notifier(Protocol):
    """Sends one message to one alert channel (a mail server, a webhook), now.

    `secret`: the channel's secret (the SMTP password, "" for none; the webhook's URL).
    :raises AlertDeliveryError: the server refused it or could not be reached (its reason in one line).
    """

    def send(self, channel: Channel, secret: str, message: Message) -> None: ...


@dataclass(frozen=True, slots=True)
class Tools:
    """What the use cases are given to reach the outside world."""

    remote: RemoteShell
    images: ImageTool
    hypervisor: Hypervisor
    buckets: Callable[[BucketAccess], ObjectStorage] | None = None  # None: no S3 client here (unit tests)
    block_server: BlockServer | None = None
    notifier: Notifier | None = None  # None: alerts cannot be sent from here (unit tests)

    def bucket(self, access: BucketAccess) -> ObjectStorage:
        if self.buckets is None:
            raise RuntimeError("no object storage client was wired")
        return self.buckets(access)


class PasswordHasher(Protocol):
    """A slow, salted password hash (argon2id): what a stolen users file costs an attacker to crack."""

    def hash(self, password: str) -> str: ...
    def verify(self, stored: str, password: str) -> bool: ...  # never raises for a wrong password
    def needs_rehash(self, stored: str) -> bool: ...
