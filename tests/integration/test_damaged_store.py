# SPDX-License-Identifier: GPL-2.0-or-later
"""Every command against every kind of damage to every file it reads under APPLIANCE_HOME: one `error:`
line naming the file, never an internal error; the other hosts still listed. Host names that are paths
are refused everywhere; reserved names at `host add`; a folder the appliance did not create keeps its mode.

No sshd or VM: the home is written with the store's own functions (and qemu-img for the point file), and
every command meets the damage before it would connect anywhere."""

from __future__ import annotations

import copy
import json
import secrets
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.domain.chain import Chain
from appliance.domain.models import DiskPoint, Host, HostKey, Point
from appliance.domain.recovery import RESERVED_NAMES, RecoveryVm, VmSettings
from appliance.errors import ConfigError, DamagedFileError
from appliance.store import catalog, hosts, recovery, schedule
from appliance.store import failback as failback_store
from appliance.store.layout import Home
from tests.conftest import Result, require, run_cli

BAD, GOOD = f"dmg-{secrets.token_hex(2)}", f"ok-{secrets.token_hex(2)}"  # unique: libvirt names VMs after hosts
POINT = "20260101T000000Z"
KEY = HostKey("ssh-ed25519", "AAAA", "SHA256:x")
FAILBACK = ["failback", BAD, "--to", "root@192.0.2.9", "--disk", "/dev/sda=/dev/sda"]
ALL_HOSTS = [["host", "list"], ["schedule"], ["failover", "status"], ["consolidate"]]  # list the good host too

# file -> (commands that read it, a field to drop, a field to give the wrong type, a document if the home has none)
FILES: dict[str, tuple[list[list[str]], tuple[Any, ...], tuple[Any, ...], object]] = {
    f"hosts/{BAD}.json": (
        [["host", "list"], ["host", "show", BAD], ["host", "set", BAD, "--timeout", "5"], ["points", BAD],
         ["verify", BAD], ["verify", BAD, "--boot"], ["backup", BAD], ["consolidate", BAD, "--dry-run"],
         ["consolidate"], ["failover", BAD], ["failover", "stop", BAD], FAILBACK, ["schedule"]],
        ("address",), ("port", "22"), None,
    ),
    f"store/{BAD}/chain.json": (
        [["points", BAD], ["verify", BAD], ["verify", BAD, "--boot"], ["backup", BAD],
         ["consolidate", BAD, "--dry-run"], ["consolidate"], ["failover", BAD], FAILBACK],
        ("points",), ("points", 0, "disks", 0, "size", "big"), None,
    ),
    f"store/{BAD}/publishing.json": (
        [["verify", BAD], ["backup", BAD], ["consolidate", BAD, "--dry-run"], ["consolidate"], FAILBACK],
        ("files",), ("files", "disk0/x.qcow2"), {"point": "20260102T000000Z", "files": []},
    ),
    f"failover/{BAD}/vm.json": (
        [["points", BAD], ["consolidate", BAD, "--dry-run"], ["consolidate"], ["failover", "status"],
         ["failover", BAD], ["failover", "stop", BAD], FAILBACK, ["host", "remove", BAD, "--purge"]],
        ("point",), ("settings", "memory_mib", "lots"), None,
    ),
    "schedule.json": ([["schedule"]], (0, "started"), (0, "ok", "yes"), None),
    f"failback/{BAD}.json": (
        [["failback", "status", BAD], ["failback", BAD, "--cutover", "now"]], ("target",), ("passes", "2"), None
    ),
    f"failback/{BAD}.target-key.json": ([FAILBACK], ("fingerprint",), ("port", "22"), None),
    "lab/lab.json": (
        [["lab", "status"], ["lab", "change", "lab1"]], ("hosts", 0, "disk"), ("hosts", 0, "loop", "no"),
        {"id": "ab12", "hosts": [{"name": "lab1", "netns": "x", "veth": "x", "address": "192.0.2.7", "gateway": "x",
                                  "folder": "/nonexistent", "disk": "/nonexistent/disk", "image": "", "loop": False}]},
    ),
}  # fmt: skip
DAMAGE = ["garbage", "empty", "wrong-type", "missing-field", "mistyped-field"]


def _host(name: str, **settings: Any) -> Host:
    return Host(name=name, address="192.0.2.1", user="root", port=22, key_file=f"keys/{name}", host_key=KEY,
                disks=("/dev/sda",), **settings)  # fmt: skip


def _vm(home: Home, name: str) -> RecoveryVm:
    folder = home.failover_dir(name)
    overlays, console = (str(folder / "disk0.qcow2"),), str(folder / "console.log")
    return RecoveryVm(name, POINT, f"recovery-{name}", "failover", datetime.now(UTC), "tcg", overlays, console,
                      VmSettings(), state="stopped")  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home where BAD has a record, a one-point chain, a kept recovery VM and a failback; GOOD a record,
    a schedule and a recovery VM: every file a command reads, all intact."""
    require("qemu-img")
    home = Home(tmp_path_factory.mktemp("damage") / "home").ensure()
    hosts.save(home, _host(BAD))
    hosts.save(home, _host(GOOD, interval=3600.0))
    disk = DiskPoint("disk0", "/dev/sda", f"disk0/{POINT}.qcow2", 1 << 20, 32768, "0" * 64)
    (home.chain_dir(BAD) / "disk0").mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(home.chain_dir(BAD) / disk.file), "1M"], check=True)
    catalog.save(home.chain_dir(BAD), Chain(BAD, (Point(POINT, datetime(2026, 1, 1, tzinfo=UTC), 1.0, (disk,)),)))
    recovery.save(home, _vm(home, BAD))
    recovery.save(home, _vm(home, GOOD))
    schedule.record(home, schedule.Outcome("backup", GOOD, datetime.now(UTC), 1.0, True, "point x"))
    failback_store.save_progress(home, BAD, {"host": BAD, "target": "root@192.0.2.9 /dev/sda", "passes": 2})
    failback_store.save_target_key(home, BAD, "192.0.2.9", 22, KEY)
    return home.root


def _damaged(good: object, damage: str, drop: tuple[Any, ...], mistype: tuple[Any, ...]) -> bytes:
    if damage in ("garbage", "empty"):
        return b"\x00\xff{not json" if damage == "garbage" else b""
    if damage == "wrong-type":
        return b"{}" if isinstance(good, list) else b"[]"
    doc = copy.deepcopy(good)
    path, value = (drop, None) if damage == "missing-field" else (mistype[:-1], mistype[-1])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    if damage == "missing-field":
        del parent[path[-1]]  # type: ignore[attr-defined]
    else:
        parent[path[-1]] = value  # type: ignore[index]
    return json.dumps(doc).encode()


def _run_each(base: Path, tmp: Path, commands: list[list[str]], change: Any = None) -> list[tuple[Path, Result]]:
    """Each command on its own copy of the home (no command waits for another's lock), a few at a time."""

    def one(i: int) -> tuple[Path, Result]:
        home = shutil.copytree(base, tmp / f"home{i}", symlinks=True)
        if change:
            change(home)
        return home, run_cli(home, *commands[i], timeout=120)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(len(commands))))


def _one_clear_line(r: Result, names: str) -> str:
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and names in errors[0], r.err
    assert "internal error" not in r.err and "Traceback" not in r.err, r.err
    return errors[0]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("relative", list(FILES), ids=[r.replace(BAD, "BAD").replace(GOOD, "GOOD") for r in FILES])
def test_every_command_names_the_damaged_file(base: Path, tmp_path: Path, relative: str, damage: str) -> None:
    commands, drop, mistype, good = FILES[relative]
    if good is None:
        good = json.loads((base / relative).read_text())

    def damage_it(home: Path) -> None:
        (home / relative).parent.mkdir(parents=True, exist_ok=True)
        (home / relative).write_bytes(_damaged(good, damage, drop, mistype))

    for (home, r), args in zip(_run_each(base, tmp_path, commands, damage_it), commands, strict=True):
        assert r.rc != 0, (args, r.out)
        _one_clear_line(r, str(home / relative))
        if args in ALL_HOSTS and relative.startswith(("hosts/", "failover/", "store/")):
            assert GOOD in r.out, (args, r.out)  # one host's damage never hides the others


@pytest.mark.parametrize("damage", ["garbage", "wrong-type", "mistyped-field"])
def test_a_damaged_accel_record_is_named_and_never_stops_a_failover(base: Path, tmp_path: Path, damage: str) -> None:
    """The accel record only saves a KVM attempt: damaged, it is named in one warning line and removed, and the
    failover goes on (on the worst day a cache file must not stand between the business and its VM)."""
    from appliance.adapters.libvirt_host import LibvirtHypervisor

    if not LibvirtHypervisor("qemu:///system").kvm_available():
        pytest.skip("the accel record is read only where KVM is offered")
    home = shutil.copytree(base, tmp_path / "home")
    (home / "failover" / BAD / "vm.json").unlink()  # no kept VM: the failover goes as far as choosing KVM or TCG
    (home / "accel.json").write_bytes(_damaged({"kvm": "broken"}, damage, (), ("kvm", 1)))
    try:
        r = run_cli(home, "failover", BAD, "--timeout", "1", timeout=120)
        warnings = [line for line in r.err.splitlines() if line.startswith("warning:") and "accel.json" in line]
        assert len(warnings) == 1 and str(home / "accel.json") in warnings[0], r.err
        assert "Traceback" not in r.err and "error:" not in r.err, r.err
        assert f"recovery-{BAD}" in r.out  # the VM was started (its boot not awaited: --timeout 1)
        assert not (home / "accel.json").exists() or run_cli(home, "failover", "status").rc == 0
    finally:
        run_cli(home, "failover", "stop", BAD)


def test_a_damaged_host_record_can_still_be_removed(base: Path, tmp_path: Path) -> None:
    home = shutil.copytree(base, tmp_path / "home")
    (home / "hosts" / f"{BAD}.json").write_text("[]")
    r = run_cli(home, "host", "remove", BAD)
    assert r.rc == 0, r.err
    assert not (home / "hosts" / f"{BAD}.json").exists()


def test_a_foreign_file_among_the_host_records_is_named(base: Path, tmp_path: Path) -> None:
    home = shutil.copytree(base, tmp_path / "home")
    (home / "hosts" / "Notes.json").write_text("{}")
    r = run_cli(home, "host", "list")
    assert r.rc == DamagedFileError.exit_code and BAD in r.out and GOOD in r.out
    _one_clear_line(r, str(home / "hosts" / "Notes.json"))


NAMED = ["points NAME", "verify NAME", "verify NAME --boot", "backup NAME", "consolidate NAME", "failover NAME",
         "failover stop NAME", "failback status NAME", "failback NAME --cutover now",
         "failback NAME --to x --disk /dev/sda=/dev/sda", "host show NAME", "host set NAME --timeout 5",
         "host remove NAME", "host remove NAME --purge"]  # fmt: skip


def test_a_host_name_that_is_a_path_is_refused_by_every_command(base: Path, tmp_path: Path) -> None:
    escape = f"../hosts/{GOOD}"  # hosts/../hosts/GOOD.json is GOOD's record: it must never be reached
    commands = [[escape if word == "NAME" else word for word in line.split()] for line in NAMED]
    for (_, r), args in zip(_run_each(base, tmp_path, commands), commands, strict=True):
        assert r.rc == ConfigError.exit_code, (args, r.err)
        _one_clear_line(r, f"invalid host name {escape!r}")
    assert (base / "hosts" / f"{GOOD}.json").exists()


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
def test_the_words_of_the_cli_cannot_name_a_host(home: Path, tmp_path: Path, name: str) -> None:
    key = tmp_path / "key"
    key.write_text("not used: refused before")
    r = run_cli(home, "host", "add", name, "--address", "192.0.2.1", "--disk", "/dev/sda", "--key", str(key))
    assert r.rc == ConfigError.exit_code
    _one_clear_line(r, f"appliance failover {name}")
    assert not (home / "hosts" / f"{name}.json").exists()


def test_a_home_the_appliance_did_not_create_keeps_its_mode(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o755)
    assert run_cli(home, "host", "list").rc == 0
    assert home.stat().st_mode & 0o777 == 0o755
    assert (home / "hosts").stat().st_mode & 0o777 == 0o700  # what it creates is private
