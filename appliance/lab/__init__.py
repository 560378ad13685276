# SPDX-License-Identifier: GPL-2.0-or-later
"""The built-in lab: protected hosts in network namespaces, each a real sshd on its own address.

Users try the appliance on it before pointing it at real servers; the tests and benchmarks use it too.
Each lab host is a network namespace joined to the appliance by a veth pair, running OpenSSH's sshd
with its own host key and an authorized key the lab generates for the appliance. Its disk is an image
file (or, with `loop=True`, a loop block device) on this machine: the namespace isolates the network,
not the file system, so "the host" reads it by path exactly as a real server reads /dev/sda.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.adapters.process import CommandFailed, run
from appliance.domain.models import validate_host_name
from appliance.errors import LabError
from appliance.lab import disks, guest
from appliance.log import get_logger
from appliance.store.files import as_type, read_as, write_json

log = get_logger(__name__)

SSHD = "/usr/sbin/sshd"


@dataclass(slots=True)
class LabHost:
    name: str
    netns: str
    veth: str
    address: str  # the host's address, as the appliance reaches it
    gateway: str  # the appliance's address on that link
    folder: str
    disk: str  # the disk path the host reads (image file or loop device)
    image: str  # the backing file of the disk
    loop: bool

    @property
    def sshd_pid_file(self) -> Path:
        return Path(self.folder) / "sshd.pid"

    @property
    def host_key_pub(self) -> Path:
        return Path(self.folder) / "ssh_host_ed25519_key.pub"


@dataclass(frozen=True, slots=True)
class _DiskRecipe:
    size: int
    data_fraction: float
    loop: bool
    image: Path | None
    guest: bool


def _free_index(lab_id: str, hosts: list[LabHost]) -> int:
    """The lowest index no host's link name (ap<lab id><index>) uses: hosts come and go, names must not collide."""
    indexes = [h.veth.removeprefix(f"ap{lab_id}") for h in hosts]
    used = {int(i) for i in indexes if i.isdigit()}
    return next(i for i in itertools.count() if i not in used)


class Lab:
    """A lab under `root` (normally $APPLIANCE_HOME/lab); `up`, `down` and `hosts` are what users see."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / "lab.json"

    # -- state ----------------------------------------------------------------------------------------

    def _load(self) -> dict[str, object]:
        return read_as(self.state_file, dict[str, object]) if self.state_file.exists() else {}

    def _save(self, state: dict[str, object]) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(self.state_file, state)

    @property
    def key_file(self) -> Path:
        return self.root / "id_ed25519"

    def hosts(self) -> list[LabHost]:
        return as_type(self._load().get("hosts", []), list[LabHost], self.state_file, "hosts")

    def host(self, name: str) -> LabHost:
        for h in self.hosts():
            if h.name == name:
                return h
        raise LabError(f"the lab has no host {name!r}", hint="`appliance lab status` lists the lab's hosts")

    # -- up / down ------------------------------------------------------------------------------------

    def up(
        self,
        names: list[str],
        *,
        disk_size: int,
        data_fraction: float = 0.4,
        loop: bool = False,
        disk_image: Path | None = None,
        with_guest: bool = False,
    ) -> list[LabHost]:
        """Create one namespace host per name (hosts that already exist are kept).

        Each disk is `disk_size` bytes of random data (`data_fraction` of it), a copy of `disk_image`, or
        `with_guest`, the lab guest (images/guest); `loop` makes it a block device."""
        recipe = _DiskRecipe(disk_size, data_fraction, loop, disk_image, with_guest)
        for name in names:
            validate_host_name(name)  # it names the host's folder under the lab
        _require_root()
        state = self._load()
        lab_id = str(state.get("id") or secrets.token_hex(2))
        existing = {h.name: h for h in self.hosts()}
        self._ensure_client_key()
        created = list(existing.values())
        for name in names:
            if name in existing:
                continue
            host = self._make_host(lab_id, name, _free_index(lab_id, created), recipe)
            created.append(host)
            self._save({"id": lab_id, "hosts": [asdict(h) for h in created]})
            log.info("lab.host_up", host=name, address=host.address, disk=host.disk)
        self._save({"id": lab_id, "hosts": [asdict(h) for h in created]})
        return created

    def down(self) -> None:
        """Stop every lab host and remove its namespace, link, loop device and files."""
        for host in self.hosts():
            self._stop_host(host)
            log.info("lab.host_down", host=host.name)
        self.state_file.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        """Stop one lab host and forget it."""
        state = self._load()
        host = self.host(name)
        self._stop_host(host)
        state["hosts"] = [asdict(h) for h in self.hosts() if h.name != name]
        self._save(state)

    def _ensure_client_key(self) -> None:
        if not self.key_file.exists():
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "appliance-lab", "-f", self.key_file])

    def _make_host(
        self,
        lab_id: str,
        name: str,
        index: int,
        recipe: _DiskRecipe,
    ) -> LabHost:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        host = LabHost(
            name=name,
            netns=f"appl-{lab_id}-{name}"[:40],
            veth=f"ap{lab_id}{index}",
            address="",
            gateway="",
            folder=str(folder),
            disk="",
            image=str(folder / "disk.img"),
            loop=recipe.loop,
        )
        try:
            with _subnet_lock():  # two labs (two test runs) must never pick the same free subnet
                subnet = _free_subnet()
                host.address, host.gateway = f"{subnet}.2", f"{subnet}.1"
                self._network(host)
            if recipe.guest:
                guest.build_guest_image(Path(host.image), size=recipe.size)
            elif recipe.image is not None:
                disks.copy_sparse(recipe.image, Path(host.image))
            else:
                disks.make(Path(host.image), recipe.size, recipe.data_fraction, seed=index)
            host.disk = disks.attach_loop(Path(host.image)) if recipe.loop else host.image
            self._start_sshd(host)
        except BaseException:
            self._stop_host(host)
            raise
        return host

    def _network(self, host: LabHost) -> None:
        try:
            run(["ip", "netns", "add", host.netns])
            run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns])
            run(["ip", "addr", "add", f"{host.gateway}/24", "dev", host.veth])
            run(["ip", "link", "set", host.veth, "up"])
            ns = ["ip", "netns", "exec", host.netns]
            run([*ns, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0"])
            run([*ns, "ip", "link", "set", "eth0", "up"])
            run([*ns, "ip", "link", "set", "lo", "up"])
        except CommandFailed as exc:
            raise LabError(f"cannot create the lab network for {host.name}: {exc.last_line}") from exc

    def _start_sshd(self, host: LabHost) -> None:
        folder = Path(host.folder)
        key = folder / "ssh_host_ed25519_key"
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lab-{host.name}", "-f", key])
        authorized = folder / "authorized_keys"
        authorized.write_text(self.key_file.with_suffix(".pub").read_text())
        config = folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {host.address}",
                    "Port 22",
                    f"HostKey {key}",
                    f"PidFile {host.sshd_pid_file}",
                    f"AuthorizedKeysFile {authorized}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PrintMotd no",
                    "MaxStartups 64",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        try:
            run(["ip", "netns", "exec", host.netns, SSHD, "-f", config])
        except CommandFailed as exc:
            raise LabError(f"sshd did not start for lab host {host.name}: {exc.last_line}") from exc
        _wait_port(host, 10.0)

    def restart_sshd(self, name: str) -> None:
        host = self.host(name)
        _kill_pidfile(host.sshd_pid_file)
        self._start_sshd(host)

    def change(self, name: str, fraction: float, *, marker: str | None = None, seed: int = 1) -> int:
        """Write to a lab host's disk as its server would; returns the bytes written.

        On the lab guest the change is a file of new data in its file system (and a new marker, so a boot
        shows which point it came from); on a plain disk, random extents.
        """
        host = self.host(name)
        size = disks.disk_size(host.disk)
        if guest.is_guest_disk(host.disk):
            data = disks.noise(int(size * fraction), seed)
            guest.write_file(host.disk, f"/change-{seed}.bin", data)
            if marker:
                guest.set_marker(host.disk, marker)
            return len(data)
        if marker:
            raise LabError(f"{name}'s disk is not the lab guest: it has no marker")
        return disks.write_extents(host.disk, size, fraction, seed=seed)

    def cut(self, name: str) -> None:
        """Kill every SSH session of the host at once: a cut mid-transfer, as a crashed link looks."""
        host = self.host(name)
        master = _read_pid(host.sshd_pid_file)
        for pid in run(["ip", "netns", "pids", host.netns]).split():
            if int(pid) != master and _comm(int(pid)) == "sshd":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def _stop_host(self, host: LabHost) -> None:
        for pid in run(["ip", "netns", "pids", host.netns]).split() if _netns_exists(host.netns) else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _kill_pidfile(host.sshd_pid_file)
        if host.loop and host.disk.startswith("/dev/loop"):
            disks.detach_loop(host.disk)
        with contextlib.suppress(CommandFailed):
            run(["ip", "link", "del", host.veth])
        if _netns_exists(host.netns):
            with contextlib.suppress(CommandFailed):
                run(["ip", "netns", "del", host.netns])
        with contextlib.suppress(FileNotFoundError):
            Path(host.image).unlink()


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces and runs sshd)")


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    """Held from choosing a subnet until its address is on a link, across every lab on this machine."""
    fd = os.open("/run/appliance-lab.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_subnet() -> str:
    used = run(["ip", "-o", "-4", "addr", "show"])
    for third in range(200, 255):
        for second in range(100, 110):
            prefix = f"10.{third}.{second}"
            if f" {prefix}." not in used:
                return prefix
    raise LabError("no free 10.x.y.0/24 subnet for the lab")


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return -1


def _kill_pidfile(path: Path) -> None:
    pid = _read_pid(path)
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    path.unlink(missing_ok=True)


def _wait_port(host: LabHost, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.address, 22), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise LabError(f"lab host {host.name}'s sshd does not answer on {host.address}:22")


def sshd_running(host: LabHost) -> bool:
    pid = _read_pid(host.sshd_pid_file)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
