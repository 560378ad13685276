# SPDX-License-Identifier: GPL-2.0-or-later
"""What the use-case tests share: an appliance home with protected hosts whose disks are plain files,
read by the real reader in a local process (LocalShell) and stored by FakeImages."""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from appliance import faults
from appliance.domain.chain import Chain
from appliance.domain.models import Host, Point
from appliance.domain.recovery import RecoveryVm, VmSettings
from appliance.ports import Tools
from appliance.services.backup import back_up
from appliance.store import catalog, hosts, recovery
from appliance.store.layout import Home
from tests.fakes import HOST_KEY, FakeHypervisor, FakeImages, LocalShell

BS = 32 * 1024  # the default block size, and the overlays' cluster size
DISK_SIZE = 4 << 20


@dataclass
class Lab:
    """One appliance home with one protected host, `web1`, and the fakes the use cases are given."""

    home: Home
    tools: Tools
    host: Host
    folder: Path

    @property
    def images(self) -> FakeImages:
        assert isinstance(self.tools.images, FakeImages)
        return self.tools.images

    @property
    def shell(self) -> LocalShell:
        assert isinstance(self.tools.remote, LocalShell)
        return self.tools.remote

    @property
    def disk(self) -> Path:
        return Path(self.host.disks[0])

    @classmethod
    def create(cls, folder: Path) -> Lab:
        home = Home(folder / "home").ensure()
        tools = Tools(remote=LocalShell(), images=FakeImages(), hypervisor=FakeHypervisor())
        return cls(home, tools, add_host(home, folder, "web1"), folder)

    def back_up(self, name: str = "web1") -> Point:
        return back_up(self.home, self.tools, name)

    def set_host(self, host: str = "web1", **settings: object) -> None:
        """Change a host's settings (`keep_last=2`), as `appliance host set` does."""
        changed = replace(hosts.load(self.home, host), **settings)  # type: ignore[arg-type]
        hosts.save(self.home, changed)
        if host == self.host.name:
            self.host = changed

    def chain(self, name: str = "web1") -> Chain:
        return catalog.load(self.home.chain_dir(name), name)

    def content(self, point: Point, slot: str = "disk0", name: str = "web1") -> bytes:
        """A stored point's disk as a VM would read it (through its backing chain)."""
        disk = point.disk(slot)
        run_dir = self.folder / "reads"
        with self.images.export(self.home.chain_dir(name) / disk.file, run_dir, writable=False) as exported:
            return exported.read(0, disk.size)

    def own_blocks(self, point: Point, slot: str = "disk0", name: str = "web1") -> dict[int, bool]:
        """The blocks a point's own file holds (not its backing files): block index -> written as zeroes."""
        path = self.home.chain_dir(name) / point.disk(slot).file
        return {i: zero for start, length, zero in self.images.own_extents(path)
                for i in range(start // BS, -(-(start + length) // BS))}  # fmt: skip

    def store_files(self, name: str = "web1") -> dict[str, str]:
        """Every file of a host's store (catalog included) with its content hash: 'unchanged' means equal."""
        root = self.home.chain_dir(name)
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"}  # fmt: skip

    def pin(self, point: str, name: str = "web1", purpose: str = "failover") -> None:
        """Record a recovery VM running from `point`, as failover does before it starts the VM."""
        vm = RecoveryVm(host=name, point=point, name=f"recovery-{name}", purpose=purpose, started=datetime.now(UTC),
                        accel="tcg", overlays=(), console_log="", settings=VmSettings())  # fmt: skip
        recovery.save(self.home, vm)


def add_host(home: Home, folder: Path, name: str, disks: int = 1, size: int = DISK_SIZE) -> Host:
    """A protected host whose disks are files in `folder`, registered (with a key file) in `home`."""
    paths = []
    for i in range(disks):
        path = folder / f"{name}-disk{i}.img"
        path.write_bytes(disk_content(size, seed=zlib.crc32(path.name.encode())))
        paths.append(str(path))
    key = home.key_file(name)
    key.write_text("not a real key: LocalShell needs none\n")
    host = Host(name=name, address="127.0.0.1", user="root", port=22, key_file=str(key.relative_to(home.root)),
                host_key=HOST_KEY, disks=tuple(paths), python=sys.executable)  # fmt: skip
    hosts.save(home, host)
    return host


def disk_content(size: int, seed: int) -> bytes:
    """Random data in about half the blocks, zeroes in the rest: a disk with holes."""
    rng = random.Random(seed)
    data = bytearray(size)
    for block in range(0, size, BS):
        if rng.random() < 0.5:
            data[block : block + BS] = rng.randbytes(min(BS, size - block))
    return bytes(data)


def change(path: Path, offset: int, data: bytes) -> None:
    """Overwrite part of a disk file, as the host's file system would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@contextmanager
def armed_fault(name: str) -> Iterator[None]:
    """`APPLIANCE_FAULT=name` for the code run inside, as the integration tests set it for a process: the
    module reads it once, at import, so it is reloaded (the functions the use cases imported from it read
    its globals anew) and reloaded again unset afterwards."""
    before = os.environ.get("APPLIANCE_FAULT")
    os.environ["APPLIANCE_FAULT"] = name
    try:
        importlib.reload(faults)
        yield
    finally:
        if before is None:
            del os.environ["APPLIANCE_FAULT"]
        else:
            os.environ["APPLIANCE_FAULT"] = before
        importlib.reload(faults)
