# SPDX-License-Identifier: GPL-2.0-or-later
"""Integration fixtures: lab hosts in network namespaces, each a real sshd, added to a test's home."""

from __future__ import annotations

import itertools
import os
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.lab import Lab, LabHost
from appliance.lab.objectstore import ObjectStore, start_object_store
from tests.conftest import require, run_cli
from tests.integration.helpers import host_add
from tests.integration.sites import Sites, two_sites

_names = itertools.count(1)
# Host names carry a token of this run: a VM left defined by a killed run never blocks a later one.
_RUN = secrets.token_hex(2)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("integration tests run as root (network namespaces, sshd, FUSE)")
    for binary in ("qemu-img", "qemu-storage-daemon", "/usr/sbin/sshd", "ip"):
        require(binary)
    _remove_stale_test_vms(_run_root(tmp_path_factory.getbasetemp()))
    lab = Lab(tmp_path_factory.mktemp("lab"))
    yield lab
    lab.down()


def _run_root(basetemp: Path) -> Path:
    """This pytest run's temporary root, shared by its xdist workers (each has a popen-gwN folder in it)."""
    return basetemp.parent if basetemp.name.startswith("popen-gw") else basetemp


def _remove_stale_test_vms(this_run: Path) -> None:
    """Undefine recovery VMs left by earlier, killed test runs: defined, shut off, disks under another pytest run."""
    try:
        import libvirt

        conn = libvirt.open("qemu:///system")
    except Exception:  # noqa: BLE001 - no libvirtd: the tests that need it say so themselves
        return
    try:
        for dom in conn.listAllDomains():
            xml = dom.XMLDesc()
            sources = [s.get("file", "") for s in ET.fromstring(xml).iterfind("./devices/disk/source")]
            other_run = [s for s in sources if "/pytest-of-" in s and not s.startswith(str(this_run))]
            if other_run and "appliance:recovery" in xml and (not dom.isActive() or not os.path.exists(other_run[0])):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    finally:
        conn.close()


MakeHost = Callable[..., LabHost]


@pytest.fixture
def make_host(lab: Lab, home: Path) -> Iterator[MakeHost]:
    """Create a lab host with a fresh disk and (unless add=False) register it in the test's home."""
    created: list[str] = []

    def make(
        size: int = 64 << 20, data: float = 0.4, loop: bool = False, add: bool = True, disks: int = 1,
        image: Path | None = None,
    ) -> LabHost:  # fmt: skip
        name = f"t{next(_names)}x{_RUN}"
        up = lab.up([name], disk_size=size, data_fraction=data, loop=loop, disk_image=image)
        host = next(h for h in up if h.name == name)
        created.append(name)
        if add:
            extra: list[str] = []
            for i in range(1, disks):
                second = Path(host.folder) / f"disk{i}.img"
                from appliance.lab import disks as lab_disks

                lab_disks.make(second, size // 2 + 512 * 3, 0.3, seed=100 + i)
                extra += ["--disk", str(second)]
            r = run_cli(home, *host_add(host, lab.key_file, *extra, "--trust-first-use"))
            assert r.rc == 0, r.err
        return host

    yield make
    for name in created:
        lab.remove(name)


@pytest.fixture(scope="session")
def object_store(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """A real S3 server (SeaweedFS) in a lab namespace of this worker's own, started once per worker."""
    store = start_object_store(lab, tmp_path_factory.mktemp("s3"), name=f"s3x{_RUN}")
    yield store
    store.stop()


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab guest (images/guest), built once per run: a bootable 1 GiB disk that prints its marker."""
    from appliance.lab.guest import build_guest_image

    return build_guest_image(tmp_path_factory.mktemp("guest") / "guest.img", size=1 << 30)


@pytest.fixture
def sites(make_host, home: Path, tmp_path: Path) -> Sites:  # type: ignore[no-untyped-def]
    """A source appliance with a lab host, its sshd, and a DR appliance granted a key (tests/integration/sites.py)."""
    return two_sites(make_host, home, tmp_path)
