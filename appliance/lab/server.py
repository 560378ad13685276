# SPDX-License-Identifier: GPL-2.0-or-later
"""The busy server: a real Debian 12 VM that writes all the time, and the check a restore of its disk must pass.

A recovery point of a server that writes while it is read is only worth something if it restores clean.
`BusyServer` boots the image of `images/server/build.sh` under QEMU (TCG) with sshd on a local port and
its workload running from the first boot: sqlite commits with fsync and 200 files rewritten in place and
by rename, each row and file carrying its own sha256. `check_point` then does to a point's disk what a
restore does (replay the ext4 journal, mount) and reports every row, file or file-system structure that
does not check out. The workload's longest stall (the longest commit or rewrite) shows what a pre-hook
such as `fsfreeze -f /` cost the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shlex
import shutil
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from appliance.adapters.process import CommandFailed, die_with_parent, run
from appliance.errors import LabError
from appliance.lab import disks
from appliance.log import get_logger

log = get_logger(__name__)

RECIPE = Path(__file__).resolve().parents[2] / "images" / "server" / "build.sh"
DISK = "/dev/vda"  # the server's disk as it sees it (virtio), what `host add --disk` names
DATA_VOLUMES = ("thin", "thick")  # LVM volumes busy-lvm can put the workload's data on (busyvg/<name>)
DATA_DISK_SIZE = 1 << 30  # the blank second disk that holds busyvg
USER = "root"
# The workload's data set and its formats, as images/server/busy writes them.
DATA = Path("var/lib/busy")
DB_NAME = "busy.sqlite"
FILE_COUNT = 200
HEADER_LEN = 100
_SHOWN = 5  # problems of one kind listed one by one; the rest are counted

_SECTOR = 512
_FSCK_SUMMARY = re.compile(r"^\S+: \d+/\d+ files ")  # "busyroot: 11/131072 files (0.0% non-contiguous), ..."
_FSCK_ANSWER = re.compile(r"^\s*[A-Z][\w ]*\? no$")  # "Fix? no" on its own line, after the finding it answers
_BUILD_TIMEOUT = 3600.0
_BOOT_TIMEOUT = 300.0


def build_server_image(dest: Path, size: int = 2 << 30) -> Path:
    """The busy server's bootable raw disk at `dest` (from the cache when the recipe did not change).

    Its pinned host key is written next to it: `host_key_file(dest)`.
    :raises LabError: the recipe is missing or its build failed.
    """
    if not RECIPE.is_file():
        raise LabError(f"the busy server recipe {RECIPE} is missing", hint="it ships in a source checkout (images/)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(["bash", RECIPE, dest, str(size)], timeout=_BUILD_TIMEOUT)
    except CommandFailed as exc:
        raise LabError(f"building the busy server image failed: {exc.last_line}") from exc
    return dest


def host_key_file(image: Path) -> Path:
    """The public SSH host key baked into `image` (one line, `ssh-ed25519 AAAA... root@busy`)."""
    return image.with_name(image.name + ".host_key.pub")


# -- the workload's counters ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriterStats:
    """One writer's counters since the last reset of its longest stall."""

    role: str
    ops: int
    bytes: int
    errors: int
    longest_stall: float  # seconds the longest commit or rewrite took
    last_error: str | None


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """What `busy-stats` printed: every writer's counters and the longest stall among them."""

    running: bool  # every writer reported in the last 30 s
    ops: int
    bytes: int
    longest_stall: float
    longest_stall_writer: str | None
    writers: dict[str, WriterStats]

    @classmethod
    def parse(cls, text: str) -> WorkloadStats:
        """:raises LabError: the output is not busy-stats' JSON."""
        try:
            doc = json.loads(text)
            writers = {
                role: WriterStats(role, int(w["ops"]), int(w["bytes"]), int(w["errors"]),
                                  float(w["longest_stall_s"]), w.get("last_error"))
                for role, w in doc["writers"].items()
            }  # fmt: skip
            return cls(bool(doc["running"]), int(doc["ops"]), int(doc["bytes"]), float(doc["longest_stall_s"]),
                       doc.get("longest_stall_writer"), writers)  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LabError(f"busy-stats printed something else than its counters: {text[:200]!r}") from exc


# -- the server as a VM ---------------------------------------------------------------------------------


class BusyServer:
    """The busy server booted from `image` on a disposable qcow2 overlay under `workdir`.

    With sshd forwarded to 127.0.0.1:`ssh_port`, root's login key `key_file` (handed to the server by the
    VM's firmware) and the host key `host_key_pub` to pin. Use it as a context manager: the VM never
    outlives the block.
    """

    def __init__(
        self,
        workdir: Path,
        image: Path,
        *,
        memory_mib: int = 1024,
        cpus: int = 2,
        boot_timeout: float = _BOOT_TIMEOUT,
        data_volume: str | None = None,
    ) -> None:
        """`data_volume` (thin or thick): the workload writes to that LVM volume of a second disk, which is
        then the server's `disk`, instead of to its root file system."""
        if data_volume is not None and data_volume not in DATA_VOLUMES:
            raise LabError(f"no data volume {data_volume!r}: use one of {', '.join(DATA_VOLUMES)}")
        self.data_volume = data_volume
        self.workdir = workdir
        self.image = image.resolve()
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.disk_image = workdir / "disk.qcow2"
        self.data_image = workdir / "data.qcow2"
        self.console_log = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self.key_file = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.host_key_pub = host_key_file(self.image)
        self.ssh_port = 0
        self.boot_seconds = 0.0  # from starting QEMU to sshd accepting the key
        self.ready_seconds = 0.0  # ... to every writer of the workload at work
        self._started = 0.0
        self._qemu: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{USER}@127.0.0.1"

    @property
    def disk(self) -> str:
        """The disk that holds the workload's data, as the server names it."""
        return f"/dev/busyvg/{self.data_volume}" if self.data_volume else DISK

    @property
    def host_key_fingerprint(self) -> str:
        """SHA256:... of the pinned host key, as `host add --host-key-fingerprint` takes it."""
        return run(["ssh-keygen", "-lf", self.host_key_pub]).split()[1]

    def __enter__(self) -> BusyServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Boot the server and return once sshd answers and every writer has written.

        :raises LabError: the image is missing, QEMU exits, or the server is not up in `boot_timeout`.
        """
        if not self.host_key_pub.is_file():
            raise LabError(f"{self.image} has no host key file {self.host_key_pub}: build it with build_server_image")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare_files()
        try:
            self._boot()
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("lab.server_up", port=self.ssh_port, boot_seconds=round(self.boot_seconds, 1))

    def _prepare_files(self) -> None:
        if not self.key_file.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "busy-lab", "-f", self.key_file])
        self.disk_image.unlink(missing_ok=True)
        # An overlay: the built image stays as built, and a boot costs no copy of its 2 GiB.
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.image, self.disk_image])
        self.data_image.unlink(missing_ok=True)
        if self.data_volume:
            run(["qemu-img", "create", "-q", "-f", "qcow2", self.data_image, str(DATA_DISK_SIZE)])

    def _boot(self) -> None:
        """Start QEMU on a free port; a port taken between choosing and binding it costs one more try."""
        for _ in range(3):
            self.ssh_port = _free_port()
            self.known_hosts.write_text(f"[127.0.0.1]:{self.ssh_port} {self.host_key_pub.read_text().strip()}\n")
            started = time.monotonic()
            self._start_qemu()
            while time.monotonic() - started < 2 and self._running():
                time.sleep(0.1)
            if self._running():
                self._started = started
                return
        raise LabError(f"QEMU did not start: {_tail(self.qemu_log)}")

    def _start_qemu(self) -> None:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-drive", f"file={self.disk_image},format=qcow2,if=virtio",
            "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-fw_cfg", f"name=opt/busy/authorized_keys,file={self.key_file.with_suffix('.pub')}",
            "-display", "none", "-monitor", "none", "-serial", f"file:{self.console_log}",
        ]  # fmt: skip
        if self.data_volume:  # busy-lvm makes busyvg on it and mounts this volume for the workload
            argv += ["-drive", f"file={self.data_image},format=qcow2,if=virtio",
                     "-fw_cfg", f"name=opt/busy/data,string={self.data_volume}"]  # fmt: skip
        with open(self.qemu_log, "wb") as qemu_log:
            self._qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

    def _running(self) -> bool:
        return self._qemu is not None and self._qemu.poll() is None

    def _wait_until_ready(self) -> None:
        deadline = self._started + self.boot_timeout
        while True:
            if not self._running():
                raise LabError(f"the busy server stopped while booting: {_tail(self.console_log)}")
            try:
                stats = self.stats(timeout=30)
            except LabError:
                stats = None
            if stats is not None and not self.boot_seconds:
                self.boot_seconds = time.monotonic() - self._started
            if stats is not None and stats.running and all(w.ops for w in stats.writers.values()):
                self.ready_seconds = time.monotonic() - self._started
                return
            if time.monotonic() > deadline:
                raise LabError(f"the busy server was not up in {self.boot_timeout:.0f} s: {_tail(self.console_log)}")
            time.sleep(1)

    def ssh(self, *argv: str, timeout: float = 60.0) -> str:
        """Run argv on the server as root (quoted, so it arrives as these words); its stdout.

        :raises LabError: ssh failed or the command exited non-zero.
        """
        try:
            return run(self._ssh_argv(argv), timeout=timeout)
        except CommandFailed as exc:
            raise LabError(f"on the busy server, {shlex.join(argv)}: {exc.last_line}") from exc

    def ssh_popen(self, *argv: str) -> subprocess.Popen[bytes]:
        """Start argv on the server as root and return at once (its output discarded)."""
        return subprocess.Popen(
            self._ssh_argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _ssh_argv(self, argv: tuple[str, ...]) -> list[str]:
        return [
            "ssh", "-i", str(self.key_file), "-p", str(self.ssh_port),
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            self.address, shlex.join(argv),
        ]  # fmt: skip

    def stats(self, timeout: float = 60.0) -> WorkloadStats:
        """The workload's counters now. :raises LabError: the server does not answer."""
        return WorkloadStats.parse(self.ssh("busy-stats", timeout=timeout))

    def reset_stats(self) -> WorkloadStats:
        """Zero every writer's longest stall (once each writer took the reset) and return the counters."""
        return WorkloadStats.parse(self.ssh("busy-stats", "--reset"))

    def stop(self) -> None:
        """Stop the VM (pulled plug: the overlay is thrown away, nothing needs a clean shutdown)."""
        if self._qemu is None:
            return
        if self._qemu.poll() is None:
            self._qemu.terminate()
            try:
                self._qemu.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._qemu.kill()
                self._qemu.wait()
        self._qemu = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "(empty log)"


# -- checking a point as a restore would ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointCheck:
    """What a restore of one point's disk finds: each problem is one line; none means clean."""

    image: Path
    problems: list[str]
    rows: int  # sqlite rows whose checksum was checked
    files: int  # workload files whose checksum was checked
    seconds: float

    @property
    def clean(self) -> bool:
        return not self.problems


def check_point(image: Path, scratch: Path) -> PointCheck:
    """Restore `image` (raw or qcow2, with its backing chain) to a raw copy under `scratch` and check it.

    The copy's ext4 journal is replayed as a boot would, then `e2fsck -fn` must find nothing; mounted
    read-only, the database must pass `PRAGMA integrity_check` after sqlite's own recovery, and every row
    and workload file must match its own sha256. The copy is deleted afterwards.
    :raises LabError: the image cannot be converted or attached (not a finding about its content).
    """
    started = time.monotonic()
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / f"{image.name}.raw"
    try:
        _convert(image, raw)
        problems, rows, files = _check_raw(raw, scratch)
    finally:
        raw.unlink(missing_ok=True)
    return PointCheck(image, problems, rows, files, time.monotonic() - started)


def _convert(image: Path, raw: Path) -> None:
    try:
        run(["qemu-img", "convert", "-U", "-O", "raw", image, raw], timeout=1800)
    except CommandFailed as exc:
        raise LabError(f"cannot convert {image} to raw: {exc.last_line}") from exc


def _check_raw(raw: Path, scratch: Path) -> tuple[list[str], int, int]:
    """The server's whole disk (its first partition, the workload under /var/lib/busy), or one of its data
    volumes (a file system of its own, mounted on /var/lib/busy)."""
    if _is_ext4(raw):
        offset, size, data = 0, raw.stat().st_size, Path()
    else:
        (offset, size), data = _first_partition(raw), DATA
    with disks.partition_loop(raw, offset, size) as device:
        problems = _replay_journal(device) + _fsck(device)
        mountpoint = scratch / "mnt"
        try:
            with _mounted(device, mountpoint):
                db_problems, rows = _check_database(mountpoint / data / "db", scratch / "db")
                file_problems, files = _check_files(mountpoint / data / "files")
        except _MountFailed as exc:
            return [*problems, f"mount -o ro: {exc}"], 0, 0
    return problems + db_problems + file_problems, rows, files


def _is_ext4(raw: Path) -> bool:
    """Whether the image starts with an ext2/3/4 superblock (magic 0xEF53 at byte 1080)."""
    with open(raw, "rb") as f:
        f.seek(1080)
        return f.read(2) == b"\x53\xef"


def _first_partition(raw: Path) -> tuple[int, int]:
    with open(raw, "rb") as f:
        mbr = f.read(_SECTOR)
    if len(mbr) < _SECTOR or mbr[510:512] != b"\x55\xaa":
        raise LabError(f"{raw} has no MBR partition table: not the busy server's disk")
    start, sectors = struct.unpack_from("<II", mbr, 446 + 8)
    if not sectors:
        raise LabError(f"{raw} has no first partition: not the busy server's disk")
    return start * _SECTOR, sectors * _SECTOR


def _replay_journal(device: str) -> list[str]:
    """Write the journal in place, as the restored server's first mount would."""
    try:
        run(["e2fsck", "-p", "-E", "journal_only", device], timeout=600, ok=(0, 1))
    except CommandFailed as exc:
        return [f"journal replay (e2fsck -E journal_only): exit {exc.returncode}: {exc.last_line}"]
    return []


def _fsck(device: str) -> list[str]:
    """e2fsck -fn's findings, one problem each (the first few), after a headline with their number."""
    try:
        run(["e2fsck", "-fn", device], timeout=1200)
        return []
    except CommandFailed as exc:
        returncode = exc.returncode
    # Its findings are on stdout, which `run` gives back only on success: ask again, accepting any exit.
    report = run(["e2fsck", "-fn", device], timeout=1200, ok=tuple(range(256)))
    findings = [
        line.strip()
        for line in report.splitlines()
        if line.strip()
        and not line.startswith("Pass ")
        and not _FSCK_SUMMARY.match(line)
        and not _FSCK_ANSWER.match(line)
    ]
    head = f"e2fsck -fn: exit {returncode}, {len(findings)} finding(s)"
    return [head, *(f"e2fsck: {f}" for f in findings[:_SHOWN])]


class _MountFailed(Exception):
    pass


@contextlib.contextmanager
def _mounted(device: str, mountpoint: Path) -> Iterator[None]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        # noload: the journal was replayed (or could not be); a read-only check must never write.
        run(["mount", "-t", "ext4", "-o", "ro,noload", device, mountpoint], timeout=120)
    except CommandFailed as exc:
        raise _MountFailed(exc.last_line) from exc
    try:
        yield
    finally:
        try:
            run(["umount", mountpoint], timeout=120)
        except CommandFailed:
            run(["umount", "-l", mountpoint], timeout=120)


def _check_database(db_dir: Path, work: Path) -> tuple[list[str], int]:
    """The database as the restored server would open it: copied with its WAL, which sqlite then replays."""
    if not (db_dir / DB_NAME).is_file():
        return [f"sqlite: {DB_NAME} is missing"], 0
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for suffix in ("", "-wal", "-journal"):
            if (db_dir / f"{DB_NAME}{suffix}").is_file():
                shutil.copyfile(db_dir / f"{DB_NAME}{suffix}", work / f"{DB_NAME}{suffix}")
    except OSError as exc:
        return [f"sqlite: cannot read the database files: {exc}"], 0
    try:
        return _check_rows(work / DB_NAME)
    except sqlite3.Error as exc:
        return [f"sqlite: {type(exc).__name__}: {exc}"], 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_rows(db: Path) -> tuple[list[str], int]:
    con = sqlite3.connect(db)
    con.text_factory = bytes  # a damaged text column must be a finding, not a decoding error
    try:
        # One row, or one row holding many lines ("*** in database main ***\nOn tree page 2 ...").
        verdict = [
            line.strip()
            for r in con.execute("PRAGMA integrity_check")
            for line in bytes(r[0]).decode(errors="replace").splitlines()
            if line.strip() and not line.startswith("*** in database")
        ]
        problems = [] if verdict == ["ok"] else _capped("sqlite integrity_check", verdict)
        bad: list[str] = []
        rows = 0
        try:
            for row_id, payload, digest in con.execute("SELECT id, payload, sha256 FROM rows"):
                rows += 1
                if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest().encode() != digest:
                    bad.append(f"row {row_id}: checksum mismatch")
        except sqlite3.Error as exc:
            bad.append(f"reading stopped after {rows} rows: {type(exc).__name__}: {exc}")
        return problems + _capped("sqlite rows", bad), rows
    finally:
        con.close()


def _check_files(folder: Path) -> tuple[list[str], int]:
    bad: list[str] = []
    for index in range(FILE_COUNT):
        name = f"f{index:03d}"
        try:
            problem = _file_problem((folder / name).read_bytes())
        except FileNotFoundError:
            problem = "missing"
        except OSError as exc:
            problem = f"unreadable: {exc.strerror}"
        if problem:
            bad.append(f"{name}: {problem}")
    return _capped("files", bad), FILE_COUNT


def _file_problem(data: bytes) -> str | None:
    """What is wrong with a workload file (header `busy-file <sha256> <seq> <length>`), or None."""
    fields = data[:HEADER_LEN].decode(errors="replace").split()
    try:
        seq, length = int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        seq = length = -1
    if len(data) < HEADER_LEN or len(fields) != 4 or fields[0] != "busy-file" or length < 0:
        return f"no valid header ({len(data)} bytes, starts {data[:16]!r})"
    payload = data[HEADER_LEN:]
    if len(payload) != length:
        return f"seq {seq}: {len(payload)} payload bytes, its header says {length}"
    if hashlib.sha256(payload).hexdigest() != fields[1]:
        return f"seq {seq}: checksum mismatch"
    return None


def _capped(kind: str, items: list[str]) -> list[str]:
    """The first few items as problems of `kind`, and one line counting the rest."""
    shown = [f"{kind}: {item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        shown.append(f"{kind}: ... {len(items) - _SHOWN} more ({len(items)} in all)")
    return shown
