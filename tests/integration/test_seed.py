# SPDX-License-Identifier: GPL-2.0-or-later
"""Seeding by disk: the source writes a host's newest point as plain files (`site export`), the DR appliance
adopts it (`site import`), and replication goes on from it with increments only.

Two appliances (two homes), the source reached over a lab host's sshd with a granted forced-command key,
as in test_replication.py.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.lab import Lab
from tests.conftest import Result, points_json, run_cli
from tests.integration.sites import Sites, add_site, digests


@pytest.fixture
def usb(tmp_path: Path) -> Path:
    """The disk that travels."""
    folder = tmp_path / "usb"
    folder.mkdir()
    return folder


def _refused(r: Result, *words: str) -> None:
    """One clear line (and maybe a hint), a non-zero exit, never a traceback."""
    assert r.rc != 0, r.out + r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.err
    for word in words:
        assert word in errors[0], r.err


def _flip_a_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _edit_manifest(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_a_host_seeded_by_disk_replicates_only_what_changed(sites: Sites, usb: Path, lab: Lab, tmp_path: Path) -> None:
    s, name = sites, sites.host.name
    assert run_cli(s.source, "backup", name).rc == 0
    exported = run_cli(s.source, "site", "export", name, str(usb))
    assert exported.rc == 0, exported.err
    folder = usb / name
    assert sorted(p.name for p in folder.iterdir()) == ["disk0.hashes", "disk0.qcow2", "manifest.json"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    assert [p.name for p in usb.iterdir()] == [name]  # nothing half-written left beside it
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(folder / "disk0.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert "backing-filename" not in info and info["virtual-size"] >= 64 << 20  # standalone
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["host"] == name and manifest["point"]["id"] == digests(s.source, name)[-1][0]
    assert manifest["settings"]["disks"] == [s.host.disk]

    add_site(s)
    # A byte flipped on the way: refused, naming the file; nothing of the host here.
    damaged = tmp_path / "damaged"
    shutil.copytree(usb, damaged)
    _flip_a_byte(damaged / name / "disk0.qcow2", (1 << 20) + 4321)
    _refused(run_cli(s.dr, "site", "import", str(damaged)), "disk0.qcow2", "sha256")
    assert not (s.dr / "hosts" / f"{name}.json").exists()
    # Another format, a missing file, a name that would be a path: refused before anything is read.
    for change, words in (
        (lambda d: d.update(format=2), ("format 2",)),
        (lambda d: d["point"].update(id="../../hosts"), ("not a point id",)),
        (lambda d: d["files"].update({"../x": {"size": 1, "sha256": "0" * 64}}), ("other files",)),
    ):
        shutil.rmtree(damaged)
        shutil.copytree(usb, damaged)
        _edit_manifest(damaged / name, change)
        _refused(run_cli(s.dr, "site", "import", str(damaged)), *words)
    shutil.rmtree(damaged)
    shutil.copytree(usb, damaged)
    (damaged / name / "disk0.hashes").unlink()
    _refused(run_cli(s.dr, "site", "import", str(damaged / name)), "disk0.hashes", "missing")
    assert not (s.dr / "hosts" / f"{name}.json").exists()

    imported = run_cli(s.dr, "site", "import", str(usb))
    assert imported.rc == 0, imported.err
    assert f"{name}: point {manifest['point']['id']} adopted as a replica of site hq" in imported.out
    assert digests(s.dr, name) == digests(s.source, name)
    seeded = points_json(s.dr, name)[-1]
    assert seeded["created"] == manifest["point"]["created"] and seeded["wire_bytes"] == 0
    assert str(seeded["extra"]["origin"]).startswith("seed from hq")  # type: ignore[index]
    v = run_cli(s.dr, "verify", name)
    assert v.rc == 0, v.out + v.err
    _refused(run_cli(s.dr, "site", "import", str(usb)), "already has 1 point")
    # The source knows the seeded point as its own (same id, same digests): it is the base of the next one.
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc == 0 and f"{name}: 0 point(s) pulled" in r.out, r.out + r.err
    granted = json.loads((s.source / "granted" / "dr1.json").read_text())
    assert granted["confirmed"] == {name: seeded["id"]}, granted

    written = lab.change(name, 0.01, seed=4)
    assert run_cli(s.source, "backup", name).rc == 0
    r = run_cli(s.dr, "replicate", "hq", name)
    assert r.rc == 0, r.err
    assert f"{name}: 1 point(s) pulled from hq" in r.out, r.out
    assert digests(s.dr, name) == digests(s.source, name)
    newest = points_json(s.dr, name)[-1]
    # The increment only: about the bytes written, far from the disk's ~26 MiB of data.
    assert newest["wire_bytes"] <= written * 1.5 + (256 << 10), (newest["wire_bytes"], written)  # type: ignore[operator]
    assert newest["wire_bytes"] < 2 << 20 and int(seeded["disks"][0]["changed_bytes"]) > 20 << 20  # type: ignore[index]
    assert run_cli(s.dr, "verify", name).rc == 0


def test_export_refuses_a_host_without_points_an_export_already_there_and_a_full_disk(sites: Sites, usb: Path) -> None:
    s, name = sites, sites.host.name
    _refused(run_cli(s.source, "site", "export", name, str(usb)), "no points")
    _refused(run_cli(s.source, "site", "export", "nosuch", str(usb)), "nosuch")
    _refused(run_cli(s.source, "site", "export", name, str(usb / "absent")), "not a folder")
    assert list(usb.iterdir()) == []
    assert run_cli(s.source, "backup", name).rc == 0

    small = usb.parent / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(small)], check=True)
    try:
        r = run_cli(s.source, "site", "export", name, str(small))
        _refused(r, str(small), "free")
        assert r.rc == 14 and list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)

    assert run_cli(s.source, "site", "export", name, str(usb)).rc == 0
    _refused(run_cli(s.source, "site", "export", name, str(usb)), "already holds an export")
    before = (usb / name / "manifest.json").read_text()
    again = run_cli(s.source, "site", "export", name, str(usb), "--force")
    assert again.rc == 0, again.err
    assert sorted(p.name for p in usb.iterdir()) == [name]
    assert json.loads(before)["point"] == json.loads((usb / name / "manifest.json").read_text())["point"]
    other = usb.parent / "other"
    (other / name).mkdir(parents=True)
    (other / name / "notes.txt").write_text("mine")
    _refused(run_cli(s.source, "site", "export", name, str(other), "--force"), "not an export")
    assert (other / name / "notes.txt").read_text() == "mine"


def test_import_refuses_no_export_and_names_the_site(sites: Sites, usb: Path) -> None:
    s, name = sites, sites.host.name
    _refused(run_cli(s.dr, "site", "import", str(usb)), "holds no export")
    (usb / f".{name}.export-abc").mkdir()  # an export cut short: its hidden folder only
    (usb / f".{name}.export-abc" / "disk0.qcow2").write_bytes(b"half")
    _refused(run_cli(s.dr, "site", "import", str(usb)), "holds no export")
    assert run_cli(s.source, "backup", name).rc == 0
    assert run_cli(s.source, "site", "export", name, str(usb)).rc == 0
    _refused(run_cli(s.dr, "site", "import", str(usb)), "no site is configured")
    add_site(s, "hq")
    _refused(run_cli(s.dr, "site", "import", str(usb), "--site", "elsewhere"), "no site named 'elsewhere'")
    add_site(s, "hq2")
    _refused(run_cli(s.dr, "site", "import", str(usb)), "2 sites")
    assert not (s.dr / "hosts" / f"{name}.json").exists()
    r = run_cli(s.dr, "site", "import", str(usb), "--site", "hq2")
    assert r.rc == 0, r.err
    assert digests(s.dr, name) == digests(s.source, name)
    _refused(run_cli(s.dr, "replicate", "hq", name), "not a replica of site hq")
