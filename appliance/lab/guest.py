# SPDX-License-Identifier: GPL-2.0-or-later
"""The lab guest: a small bootable Linux disk whose boot prints a marker, to prove which point booted.

Failover boots a recovery point as a VM; to check that booting point N really boots the disk as it was
at point N, the protected host's disk is this guest: its init prints `APPLIANCE-GUEST-UP marker=<the
first line of /marker.txt>` on the serial console (and the VGA screen). Change the marker between
backups and each point boots with its own. `/autorun.sh`, if present, runs once the disk is mounted,
so a test can make the running guest write to its own disk.

The image is built by `images/guest/build.sh` from Debian packages (cached under `images/build/`);
the files inside it are read and changed with `debugfs` on the ext4 partition, without mounting it.
The disk must not be in use meanwhile: that is checked for QEMU (its image locks), not for mounts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.adapters.process import CommandFailed, run
from appliance.errors import LabError
from appliance.lab import disks

RECIPE = Path(__file__).resolve().parents[2] / "images" / "guest" / "build.sh"
LABEL = "approot"
MARKER_FILE = "/marker.txt"
AUTORUN_FILE = "/autorun.sh"

UP_PATTERN = re.compile(r"APPLIANCE-GUEST-UP marker=(\S*)")
AUTORUN_DONE_PATTERN = re.compile(r"APPLIANCE-AUTORUN-DONE rc=(-?\d+)")

_SECTOR = 512
_EXT_MAGIC = 0xEF53
_INCOMPAT_RECOVER = 0x0004  # the journal holds transactions not yet written in place
# QEMU locks bytes from 100 on its images (one per permission) with OFD locks, which conflict with
# the POSIX lock taken here: a disk that a VM or qemu-storage-daemon has open cannot be locked.
_QEMU_LOCK_START = 100
_QEMU_LOCK_LENGTH = 200
_BUILD_TIMEOUT = 1800.0


def build_guest_image(dest: Path, size: int = 1 << 30, marker: str = "base") -> Path:
    """A bootable guest disk of `size` bytes (raw, sparse) at `dest`, printing `marker` when it boots."""
    _check_marker(marker)
    if not RECIPE.is_file():
        raise LabError(
            f"the guest image recipe {RECIPE} is missing",
            hint="guest images are built from a source checkout of the appliance (images/guest/)",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(["bash", RECIPE, dest, str(size)], timeout=_BUILD_TIMEOUT)
    except CommandFailed as exc:
        raise LabError(f"building the guest image failed: {exc.last_line}") from exc
    set_marker(dest, marker)
    return dest


def set_marker(disk: Path | str, text: str) -> None:
    """Make the guest on `disk` (image file or block device, not in use) print `text` at its next boot."""
    _check_marker(text)
    write_file(disk, MARKER_FILE, f"{text}\n".encode())


def read_marker(disk: Path | str) -> str:
    """The marker the guest on `disk` will print at its next boot ("" if it has none)."""
    data = read_file(disk, MARKER_FILE)
    if data is None:
        return ""
    lines = data.decode(errors="replace").splitlines()
    return lines[0].strip() if lines else ""


def write_autorun(disk: Path | str, script_text: str) -> None:
    """A shell script the guest runs (with cwd /root, where its disk is mounted) each time it boots."""
    write_file(disk, AUTORUN_FILE, script_text.encode(), mode=0o755)


def is_guest_disk(disk: Path | str) -> bool:
    """Whether `disk` holds the lab guest (an MBR whose first partition is ext4 labelled approot)."""
    try:
        part = _first_partition(str(disk))
        with open(part.disk, "rb") as f:
            f.seek(part.offset + 1024 + 0x78)  # the ext superblock's volume name
            return f.read(16).rstrip(b"\0") == LABEL.encode()
    except (OSError, LabError):
        return False


def marker_from_console(text: str) -> str | None:
    """The marker in a console log; the last one if the log holds several boots, None if none is up yet."""
    found = UP_PATTERN.findall(text)
    return found[-1] if found else None


def read_file(disk: Path | str, path: str) -> bytes | None:
    """The content of `path` in the guest's file system, or None if there is no such file."""
    _check_guest_path(path)
    part = _prepare(disk)
    with tempfile.TemporaryDirectory(prefix="guest-") as tmp:
        local = Path(tmp) / "data"
        _debugfs(part, [f'dump "{path}" "{local}"'], write=False)
        return local.read_bytes() if local.exists() else None


def write_file(disk: Path | str, path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace (or create) `path` in the guest's file system; its directory must exist."""
    _check_guest_path(path)
    part = _prepare(disk)
    with tempfile.TemporaryDirectory(prefix="guest-") as tmp:
        local = Path(tmp) / "data"
        local.write_bytes(data)
        local.chmod(mode)  # debugfs gives the new inode the local file's mode
        # rm fails harmlessly when the file is new; debugfs exits 0 either way, hence the read-back.
        _debugfs(part, [f'rm "{path}"', f'write "{local}" "{path}"'], write=True)
    if read_file(disk, path) != data:
        raise LabError(f"could not write {path} on {disk}: it does not read back (no such directory? full?)")


@dataclass(frozen=True)
class _Partition:
    """The guest's ext4 partition: where it lies on its disk."""

    disk: str
    offset: int
    size: int

    @property
    def spec(self) -> str:
        # e2fsprogs' unix I/O manager takes the partition's offset as an option of the device name.
        return f"{self.disk}?offset={self.offset}"


def _prepare(disk: Path | str) -> _Partition:
    """The partition of an idle guest disk, its journal replayed so that it reads as the guest left it."""
    path = str(disk)
    if "?" in path or '"' in path:
        raise LabError(f"unsupported characters in the disk path {path!r}")
    _refuse_if_in_use(path)
    part = _first_partition(path)
    if _needs_recovery(part):
        _replay_journal(part)
    return part


def _refuse_if_in_use(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise LabError(f"cannot open the guest disk {path}: {exc.strerror}") from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _QEMU_LOCK_LENGTH, _QEMU_LOCK_START)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise LabError(f"the guest disk {path} is in use by a running VM (QEMU holds its lock)") from exc
    finally:
        os.close(fd)


def _first_partition(path: str) -> _Partition:
    with open(path, "rb") as f:
        mbr = f.read(_SECTOR)
    if len(mbr) < _SECTOR or mbr[510:512] != b"\x55\xaa":
        raise LabError(f"{path} has no MBR partition table: not a guest disk")
    start, sectors = struct.unpack_from("<II", mbr, 446 + 8)
    if sectors == 0:
        raise LabError(f"{path} has no first partition: not a guest disk")
    return _Partition(path, start * _SECTOR, sectors * _SECTOR)


def _needs_recovery(part: _Partition) -> bool:
    with open(part.disk, "rb") as f:
        f.seek(part.offset + 1024)
        sb = f.read(1024)
    magic = struct.unpack_from("<H", sb, 0x38)[0] if len(sb) == 1024 else 0
    label = sb[0x78:0x88].rstrip(b"\0").decode(errors="replace")
    if magic != _EXT_MAGIC or label != LABEL:
        raise LabError(f"{part.disk} has no ext4 file system labelled {LABEL} in its first partition")
    incompat: int = struct.unpack_from("<I", sb, 0x60)[0]
    return bool(incompat & _INCOMPAT_RECOVER)


def _replay_journal(part: _Partition) -> None:
    """Write the journal in place, as the guest's next mount would: a killed guest leaves one to replay.

    On a loop device, since e2fsck and debugfs lose the `?offset=` option when they reopen the file
    system after a replay.
    """
    with disks.partition_loop(part.disk, part.offset, part.size) as device:
        try:
            run(["e2fsck", "-p", "-E", "journal_only", device], timeout=300)
        except CommandFailed as exc:
            if exc.returncode != 1:  # 1: "errors corrected", here the replay itself
                raise LabError(f"cannot replay the journal of {part.disk}: {exc.last_line}") from exc


def _debugfs(part: _Partition, commands: Sequence[str], *, write: bool) -> None:
    """Run debugfs commands on the partition. It exits 0 even when a command fails: callers check."""
    with tempfile.TemporaryDirectory(prefix="guest-") as tmp:
        script = Path(tmp) / "commands"
        script.write_text("".join(f"{c}\n" for c in commands))
        argv = ["debugfs", *(["-w"] if write else []), "-f", str(script), part.spec]
        try:
            run(argv, timeout=120)
        except CommandFailed as exc:
            raise LabError(f"debugfs failed on {part.disk}: {exc.last_line}") from exc


def _check_marker(text: str) -> None:
    # The console line is matched with \S*: a marker must be one non-empty word.
    if not text or any(c.isspace() for c in text):
        raise LabError(f"a guest marker is one word without spaces, not {text!r}")


def _check_guest_path(path: str) -> None:
    if not path.startswith("/") or any(c.isspace() or c == '"' for c in path):
        raise LabError(f"unsupported guest path {path!r}: absolute, without spaces or quotes")
