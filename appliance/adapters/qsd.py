# SPDX-License-Identifier: GPL-2.0-or-later
"""qemu-storage-daemon: a qcow2 image (with its backing chain) seen as one plain file over FUSE.

Points are written and read through QEMU's own qcow2 code, never by a hand-written qcow2 writer: the
daemon is started with nothing but a QMP monitor, and the image and its FUSE export are added over QMP
(qemu.qmp), so every failure arrives as a QMP error naming what went wrong.

A block that became zero is written with FALLOC_FL_ZERO_RANGE, which QEMU turns into a zero cluster.
Punching a hole instead would be wrong on an overlay: the hole reads through to the backing file's old
data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from appliance.adapters.process import die_with_parent
from appliance.errors import ImageToolError, StoreFullError
from appliance.log import get_logger

log = get_logger(__name__)

QSD = "qemu-storage-daemon"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_ZERO_RANGE = 0x10
START_TIMEOUT = 15.0
_SUN_PATH_MAX = 107  # bytes of a unix socket's path (sockaddr_un.sun_path, without its final NUL)
_QMP_GONE = (QMPError, OSError, EOFError, TimeoutError, ImageToolError)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _zero_range(fd: int, offset: int, length: int) -> None:
    """Make a range read as zeroes in the exported image (a zero cluster, never a hole)."""
    if _libc.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_SOCKET_DIR_PREFIX = "appliance-qmp-"


def _remove_stale_socket_dirs() -> None:
    """The short socket folders of appliance processes that were killed (SIGKILL skips their cleanup)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_SOCKET_DIR_PREFIX}*-*"):
        pid = folder.name[len(_SOCKET_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)


class ImageExport:
    """Context manager: `image` open in qemu-storage-daemon and exported over FUSE as the plain file
    `self.path`, read and written through the ExportedImage methods while the block is open."""

    def __init__(
        self, image: Path, run_dir: Path, *, writable: bool, backing: bool = True, export: bool = True
    ) -> None:
        self.image = image
        self.writable = writable
        self.export = export  # False: the image is only opened, for block jobs (see copy_dirty)
        self.backing = backing  # False: unallocated clusters read as zeroes, the backing file is not opened
        token = uuid.uuid4().hex[:12]
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / f"export-{token}"
        self._socket = run_dir / f"qmp-{token}.sock"
        self._socket_dir: Path | None = None
        if len(os.fsencode(self._socket)) > _SUN_PATH_MAX:  # a deep APPLIANCE_HOME: AF_UNIX takes 107 bytes
            _remove_stale_socket_dirs()
            self._socket_dir = Path(tempfile.mkdtemp(prefix=f"{_SOCKET_DIR_PREFIX}{os.getpid()}-"))  # 0700
            self._socket = self._socket_dir / "qmp.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._fd: int | None = None

    def __enter__(self) -> ImageExport:
        self.path.touch(mode=0o600)
        try:
            self._start()
            node: dict[str, object] = {
                "driver": "qcow2",
                "node-name": "img",
                "read-only": not self.writable,
                "file": {"driver": "file", "filename": str(self.image.resolve())},
            }
            if not self.backing:
                node["backing"] = None
            self._qmp_cmd("blockdev-add", **node)
            if not self.export:
                return self
            self._qmp_cmd(
                "block-export-add",
                **{
                    "type": "fuse",
                    "id": "exp",
                    "node-name": "img",
                    "mountpoint": str(self.path),
                    "writable": self.writable,
                },
            )
            self._fd = os.open(self.path, os.O_RDWR if self.writable else os.O_RDONLY)
        except BaseException:
            self._stop()
            raise
        log.debug("qsd.exported", image=str(self.image), writable=self.writable)
        return self

    # -- the ExportedImage port ------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        fd = self._open_fd()
        try:
            data = os.pread(fd, length, offset)
            while len(data) < length:
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    raise ImageToolError(f"{self.image.name} reads short at byte {offset + len(data)}")
                data += more
        except OSError as exc:
            raise self._io_error(exc, "read") from exc
        return data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        fd = self._open_fd()
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise self._io_error(exc, "write") from exc

    def zero(self, offset: int, length: int) -> None:
        try:
            _zero_range(self._open_fd(), offset, length)
        except OSError as exc:
            raise self._io_error(exc, "zero") from exc

    def flush(self) -> None:
        try:
            os.fsync(self._open_fd())
        except OSError as exc:
            raise self._io_error(exc, "flush") from exc

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ImageToolError(f"{self.image.name} is not exported")
        return self._fd

    def _io_error(self, exc: OSError, what: str) -> ImageToolError | StoreFullError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFullError(f"the appliance's disk is full while writing {self.image.name}")
        return ImageToolError(f"cannot {what} {self.image.name}: {exc.strerror or exc}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop(clean=exc_type is None)

    def _start(self) -> None:
        # The appliance listens and the daemon connects to it (as qemu.machine does): no race between the
        # daemon creating its socket and a client connecting to it.
        qmp = QEMUMonitorProtocol(str(self._socket), server=True)
        argv = [QSD, "--chardev", f"socket,id=mon,path={self._socket}", "--monitor", "chardev=mon"]
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=die_with_parent,
            )
        except FileNotFoundError as exc:
            qmp.close()
            raise ImageToolError(f"{QSD} is not installed (Debian package qemu-system-common)") from exc
        try:
            qmp.accept(timeout=START_TIMEOUT)
        except (QMPError, OSError, TimeoutError) as exc:
            with contextlib.suppress(*_QMP_GONE):
                qmp.close()
            raise ImageToolError(f"{QSD} did not start: {self._stderr_tail() or exc}") from exc
        self._qmp = qmp

    def _qmp_cmd(self, command: str, /, **args: object) -> object:
        assert self._qmp is not None
        try:
            return self._qmp.cmd(command, **args)
        except QMPError as exc:
            raise ImageToolError(f"{QSD} refused {command} on {self.image.name}: {exc}") from exc

    def _stop(self, clean: bool = False) -> None:
        """Close the export and the image. On the clean path every step must succeed: `blockdev-del`
        is QEMU's last flush of the qcow2 metadata, and a point is only kept if it happened."""
        failure: BaseException | None = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._qmp is not None:
            try:
                if self.export:
                    self._qmp_cmd("block-export-del", id="exp")
                    self._wait_export_deleted()
                self._qmp_cmd("blockdev-del", **{"node-name": "img"})
            except _QMP_GONE as exc:
                failure = exc
            with contextlib.suppress(*_QMP_GONE):
                self._qmp.close()
            self._qmp = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # the daemon exits cleanly on SIGTERM, closing whatever is still open
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.returncode not in (0, -signal.SIGTERM) and failure is None:
                failure = ImageToolError(f"{QSD} exited {self._proc.returncode}: {self._stderr_tail()}")
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        unmount_stale(self.path)
        for leftover in (self.path, self._socket):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        if self._socket_dir is not None:
            with contextlib.suppress(OSError):
                self._socket_dir.rmdir()
        if clean and failure is not None:
            raise ImageToolError(f"closing {self.image.name} failed: {failure}") from failure

    def copy_dirty(self, bitmaps: list[str], target: Path) -> None:
        """Copy the clusters marked in the image's persistent dirty bitmaps (their union) into `target`, an
        empty qcow2 of the same size, with QEMU's backup job; the bitmaps themselves are left as they are."""
        bitmap = bitmaps[0]
        if len(bitmaps) > 1:  # libvirt's later checkpoints each hold the changes after them: merge
            self._qmp_cmd("block-dirty-bitmap-add", **{"node": "img", "name": "appliance-merged", "persistent": False})
            self._qmp_cmd("block-dirty-bitmap-merge", node="img", target="appliance-merged", bitmaps=bitmaps)
            bitmap = "appliance-merged"
        self._qmp_cmd(
            "blockdev-add",
            **{"driver": "qcow2", "node-name": "dst", "file": {"driver": "file", "filename": str(target.resolve())}},
        )
        self._qmp_cmd(
            "blockdev-backup",
            **{"job-id": "dirty", "device": "img", "target": "dst", "sync": "bitmap", "bitmap": bitmap,
               "bitmap-mode": "never", "auto-dismiss": True},
        )  # fmt: skip
        event = self._wait_event("BLOCK_JOB_COMPLETED", 3600)
        if event is None:
            raise ImageToolError(f"copying the dirty blocks of {self.image.name} did not finish")
        self._qmp_cmd("blockdev-del", **{"node-name": "dst"})
        error = event.get("data", {}).get("error")
        if error:
            raise ImageToolError(f"copying the dirty blocks of {self.image.name} failed: {error}")

    def _wait_export_deleted(self) -> None:
        if self._wait_event("BLOCK_EXPORT_DELETED", 30) is None:
            raise ImageToolError(f"the FUSE export of {self.image.name} did not close within 30 s")

    def _wait_event(self, name: str, seconds: float) -> dict[str, Any] | None:
        """The next QMP event called `name`, or None after `seconds`."""
        assert self._qmp is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                event = self._qmp.pull_event(wait=1.0)
            except TimeoutError:
                continue
            if event and event.get("event") == name:
                return dict(event)
        return None

    def _stderr_tail(self) -> str:
        if self._proc is None or self._proc.stderr is None or self._proc.poll() is None:
            return "timed out"
        if self._proc.stderr.closed:
            return f"exited {self._proc.returncode}"
        lines = self._proc.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exited {self._proc.returncode}"


def unmount_stale(mountpoint: Path) -> None:
    """Detach a FUSE mount left behind by a killed daemon (reads fail with ENOTCONN)."""
    if not _is_mountpoint(mountpoint):
        return
    libc_umount2 = _libc.umount2
    libc_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    MNT_DETACH = 2
    if libc_umount2(str(mountpoint).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("qsd.unmount_failed", path=str(mountpoint), error=os.strerror(err))


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False
