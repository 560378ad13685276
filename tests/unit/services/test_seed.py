# SPDX-License-Identifier: GPL-2.0-or-later
"""Seeding by disk against the fakes: what an export holds, what an import proves before it publishes, and
the room an export needs (pure)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.domain.models import Site
from appliance.errors import ChainCorruptError, ConfigError, DamagedFileError, StoreFullError
from appliance.services import seed
from appliance.services.seed import export_host, find_manifests, import_seeds, read_manifest, room_needed, seed_files
from appliance.store import catalog, hosts, sites
from appliance.store.layout import Home
from tests.fakes import HOST_KEY
from tests.unit.services.helpers import BS, Lab, change

M = 1 << 20
C = 64 * 1024  # the flattened images' cluster size


def _dr(lab: Lab) -> Home:
    home = Home(lab.folder / "dr").ensure()
    sites.save(home, Site(name="hq", address="192.0.2.1", user="root", port=22, key_file="keys/site-hq",
                          host_key=HOST_KEY))  # fmt: skip
    return home


def _exported(lab: Lab) -> Path:
    lab.back_up()
    change(lab.disk, 3 * BS, random.Random(2).randbytes(BS))
    lab.back_up()
    usb = lab.folder / "usb"
    usb.mkdir()
    export_host(lab.home, lab.tools, "web1", usb)
    return usb


def test_an_export_holds_the_newest_point_flattened_and_an_import_adopts_it_under_its_id(lab: Lab) -> None:
    usb = _exported(lab)
    newest = lab.chain().points[-1]
    manifest = read_manifest(usb / "web1" / seed.MANIFEST)
    assert manifest.point.id == newest.id and manifest.point.disks == newest.disks
    assert sorted(manifest.files) == ["disk0.hashes", "disk0.qcow2"]
    assert lab.images.info_chain(usb / "web1" / "disk0.qcow2")[0].get("backing-filename") is None

    dr = _dr(lab)
    (done,) = import_seeds(dr, lab.tools, usb)
    assert done.site == "hq" and done.point.id == newest.id and done.point.created == newest.created
    here = catalog.load(dr.chain_dir("web1"), "web1").points
    assert [(p.id, [d.digest for d in p.disks]) for p in here] == [(newest.id, [d.digest for d in newest.disks])]
    assert hosts.load(dr, "web1").replica_of == "hq"
    with lab.images.export(dr.chain_dir("web1") / here[0].disks[0].file, lab.folder / "r", writable=False) as image:
        assert image.read(0, newest.disks[0].size) == lab.disk.read_bytes()
    with pytest.raises(ConfigError, match="already has 1 point"):
        import_seeds(dr, lab.tools, usb)


def test_an_image_that_does_not_read_as_its_digest_is_refused_even_with_a_matching_sha256(lab: Lab) -> None:
    usb = _exported(lab)
    image = usb / "web1" / "disk0.qcow2"
    with lab.images.export(image, lab.folder / "w", writable=True) as exported:
        exported.write(5 * BS, b"not what the source held")
    manifest = json.loads((usb / "web1" / seed.MANIFEST).read_text())
    manifest["files"]["disk0.qcow2"] = {"size": image.stat().st_size, "sha256": seed._describe(image).sha256}
    (usb / "web1" / seed.MANIFEST).write_text(json.dumps(manifest))
    dr = _dr(lab)
    with pytest.raises(ChainCorruptError, match="does not read as the digest"):
        import_seeds(dr, lab.tools, usb)
    assert catalog.load(dr.chain_dir("web1"), "web1").points == ()
    assert [p.name for p in (dr.chain_dir("web1") / "disk0").iterdir()] == []  # nothing half-written kept
    assert not hosts.exists(dr, "web1")


def test_an_export_cut_by_a_full_disk_leaves_nothing_behind(lab: Lab) -> None:
    lab.back_up()
    usb = lab.folder / "usb"
    usb.mkdir()
    lab.images.fail("flatten", StoreFullError("cannot write it: its disk is full"))
    with pytest.raises(StoreFullError, match=f"{usb} is full"):
        export_host(lab.home, lab.tools, "web1", usb)
    assert list(usb.iterdir()) == []
    export_host(lab.home, lab.tools, "web1", usb)  # the chain was left unlocked and as it was
    assert sorted(p.name for p in (usb / "web1").iterdir()) == ["disk0.hashes", "disk0.qcow2", "manifest.json"]


def test_the_hidden_folder_of_a_cut_export_is_removed_by_the_next_one_unless_its_process_runs(lab: Lab) -> None:
    lab.back_up()
    usb = lab.folder / "usb"
    cut, running = usb / f".web1.export-{_ended_pid()}-abc", usb / f".web1.export-{os.getpid()}-def"
    for folder in (cut, running):
        folder.mkdir(parents=True)
        (folder / "disk0.qcow2").write_bytes(b"half")
    export_host(lab.home, lab.tools, "web1", usb)
    assert sorted(p.name for p in usb.iterdir()) == [running.name, "web1"]


def _ended_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_two_exports_of_one_host_are_refused_before_anything_is_read(lab: Lab) -> None:
    usb = _exported(lab)
    shutil.copytree(usb / "web1", usb / "web1-copy")
    with pytest.raises(ConfigError, match="two exports of web1"):
        import_seeds(_dr(lab), lab.tools, usb)


def test_the_point_keeps_its_own_block_size_when_the_host_setting_changed(lab: Lab) -> None:
    lab.back_up()
    lab.set_host(block_size=64 * 1024)  # after the chain started at 32K: the chain keeps 32K
    usb = _exported(lab)
    assert lab.chain().points[-1].disks[0].block_size == BS
    dr = _dr(lab)
    (done,) = import_seeds(dr, lab.tools, usb, "hq")
    assert done.point.disks[0].block_size == BS


def test_a_file_of_the_export_that_changed_is_named(lab: Lab) -> None:
    usb = _exported(lab)
    hashes = usb / "web1" / "disk0.hashes"
    hashes.write_bytes(hashes.read_bytes()[:-1] + b"\0")
    with pytest.raises(DamagedFileError, match="disk0.hashes does not match its sha256"):
        import_seeds(_dr(lab), lab.tools, usb)


def test_find_manifests_takes_one_export_or_a_folder_of_them_never_a_hidden_one(tmp_path: Path) -> None:
    for name in ("web1", "db1", ".web2.export-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / seed.MANIFEST).write_text("{}")
    (tmp_path / "empty").mkdir()
    assert find_manifests(tmp_path) == [tmp_path / "db1" / seed.MANIFEST, tmp_path / "web1" / seed.MANIFEST]
    assert find_manifests(tmp_path / "web1") == [tmp_path / "web1" / seed.MANIFEST]
    with pytest.raises(ConfigError, match="holds no export"):
        find_manifests(tmp_path / "empty")


def test_a_manifest_of_another_format_or_naming_paths_is_refused(lab: Lab) -> None:
    usb = _exported(lab)
    path = usb / "web1" / seed.MANIFEST
    good = json.loads(path.read_text())
    for change_doc, error, words in (
        (lambda d: d.update(format=2), ConfigError, "format 2"),
        (lambda d: d.update(host="../hosts"), DamagedFileError, "not a host name"),
        (lambda d: d["point"]["disks"][0].update(slot="../d"), DamagedFileError, "not a point id or disk slot"),
        (lambda d: d["settings"].update(disks=[]), DamagedFileError, "disk(s)"),
        (lambda d: d["files"].pop("disk0.hashes"), DamagedFileError, "other files"),
    ):
        doc = json.loads(json.dumps(good))
        change_doc(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            read_manifest(path)


def test_seed_files_are_each_disks_image_and_hash_list(lab: Lab) -> None:
    point = lab.back_up()
    assert seed_files(point) == ["disk0.qcow2", "disk0.hashes"]


@pytest.mark.parametrize(
    ("size", "zero", "data"),
    [
        (8 * M, [(0, 8 * M)], 0),  # all zero: no data cluster
        (8 * M, [], 8 * M),  # all data
        (8 * M, [(C // 2, 8 * M - C)], 2 * C),  # data in the first and the last half-cluster: two clusters
        (8 * M, [(0, C), (2 * C, 8 * M - 2 * C)], C),  # one whole cluster of data
        (100 * C + 512, [], 101 * C),  # a last partial cluster counts whole
    ],
)
def test_room_needed_counts_whole_clusters_of_data_and_the_tables(size: int, zero: list[tuple[int, int]],
                                                                  data: int) -> None:  # fmt: skip
    clusters = -(-size // C)
    hash_list = -(-size // BS) * 32
    assert room_needed(size, zero, BS) == data + clusters * 10 + M + hash_list
