# SPDX-License-Identifier: GPL-2.0-or-later
"""consolidate: the policy drops the right points, every kept point reads as before, a pinned point
defers what would rewrite its backing chain, and a merge cut short is finished by the next run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.domain.models import Point
from appliance.errors import ChainError, ImageToolError
from appliance.services.consolidate import consolidate, drop_point
from appliance.services.verify import verify_chain
from appliance.store import hosts, recovery
from tests.unit.services.helpers import BS, Lab, add_host, change


def _chain(lab: Lab, count: int, name: str = "web1") -> list[Point]:
    """`count` points of the host, with a few bytes changed and one block zeroed on each disk between them."""
    points = [lab.back_up(name)]
    for i in range(1, count):
        rng = random.Random(i)
        for disk in [Path(d) for d in hosts.load(lab.home, name).disks]:
            size = disk.stat().st_size
            for _ in range(3):
                change(disk, rng.randrange(size - 5000), rng.randbytes(5000))
            change(disk, rng.randrange(size // BS) * BS, bytes(BS))
        points.append(lab.back_up(name))
    return points


def _contents(lab: Lab, points: list[Point], name: str = "web1") -> dict[tuple[str, str], bytes]:
    return {(p.id, d.slot): lab.content(p, d.slot, name) for p in points for d in p.disks}


def test_keep_last_merges_the_older_points_and_every_kept_point_reads_as_before(lab: Lab) -> None:
    points = _chain(lab, 5)
    ids = [p.id for p in points]
    before = _contents(lab, points)
    lab.set_host(keep_last=2)
    files = lab.store_files()
    assert consolidate(lab.home, lab.tools, "web1", dry_run=True).merged == []
    assert lab.store_files() == files  # a dry run changes nothing

    report = consolidate(lab.home, lab.tools, "web1")

    assert report.merged == ids[:3]
    kept = list(lab.chain().points)
    assert [p.id for p in kept] == ids[3:]
    assert _contents(lab, kept) == {k: v for k, v in before.items() if k[0] in ids[3:]}
    assert set(lab.store_files()) == {"chain.json", f"disk0/{ids[3]}.qcow2", f"disk0/{ids[4]}.qcow2",
                                      f"disk0/{ids[4]}.hashes"}  # fmt: skip
    assert all(check.ok for check in verify_chain(lab.home, lab.tools, "web1"))
    change(lab.disk, 0, random.Random(9).randbytes(BS))
    assert lab.back_up().disks[0].sent_bytes == BS  # the merged chain goes on incrementally


def test_a_pinned_point_is_kept_and_defers_the_drops_below_it(lab: Lab) -> None:
    points = _chain(lab, 5)
    ids = [p.id for p in points]
    before = _contents(lab, points)
    lab.pin(ids[2])
    pinned_chain = {f"disk0/{i}.qcow2" for i in ids[:3]}
    files = {k: v for k, v in lab.store_files().items() if k in pinned_chain}
    lab.set_host(keep_last=1)

    report = consolidate(lab.home, lab.tools, "web1")

    assert report.merged == [ids[3]]
    assert [d.point for d in report.deferred] == ids[:2]
    assert {k: v for k, v in lab.store_files().items() if k in pinned_chain} == files  # the VM's chain untouched
    assert _contents(lab, list(lab.chain().points)) == {k: v for k, v in before.items() if k[0] != ids[3]}
    with pytest.raises(ChainError, match="in use"):
        drop_point(lab.home, lab.tools, "web1", ids[1])

    recovery.remove(lab.home, "web1")  # the VM is gone: the deferred drops happen
    assert consolidate(lab.home, lab.tools, "web1").merged == ids[:3]
    assert _contents(lab, list(lab.chain().points)) == {(ids[4], "disk0"): before[(ids[4], "disk0")]}


def test_a_merge_cut_short_is_finished_by_the_next_run(lab: Lab) -> None:
    add_host(lab.home, lab.folder, "db1", disks=2, size=2 << 20)
    points = _chain(lab, 3, "db1")
    ids = [p.id for p in points]
    before = _contents(lab, points, "db1")
    lab.set_host("db1", keep_last=1)
    lab.images.fail("commit", ImageToolError("qemu-img commit was killed"), after=1)  # disk0 merged, disk1 not

    with pytest.raises(ImageToolError):
        consolidate(lab.home, lab.tools, "db1")

    chain = lab.chain("db1")
    assert [(p.id, p.dropping) for p in chain.points] == [(ids[0], True), (ids[1], False), (ids[2], False)]
    assert _contents(lab, list(chain.points[1:]), "db1") == {k: v for k, v in before.items() if k[0] != ids[0]}

    report = consolidate(lab.home, lab.tools, "db1")

    assert report.merged == [ids[1]]
    assert [p.id for p in lab.chain("db1").points] == [ids[2]]
    assert _contents(lab, [lab.chain("db1").points[0]], "db1") == {k: v for k, v in before.items() if k[0] == ids[2]}
    assert all(check.ok for check in verify_chain(lab.home, lab.tools, "db1"))
