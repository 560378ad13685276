# SPDX-License-Identifier: GPL-2.0-or-later
"""verify_chain: a point whose content changed is named with its digest mismatch and recorded as failed;
--repair rebuilds the newest point's block hash list from the point itself."""

from __future__ import annotations

import random

import pytest

from appliance.services.verify import verify_chain
from tests.unit.services.helpers import BS, Lab, change


def test_an_altered_point_is_reported_and_recorded_as_failed(lab: Lab) -> None:
    first = lab.back_up()
    change(lab.disk, 0, random.Random(1).randbytes(BS))
    second = lab.back_up()
    with lab.images.export(lab.home.chain_dir("web1") / second.disks[0].file, lab.folder, writable=True) as image:
        image.write(5 * BS, b"bit rot")  # behind the appliance's back

    checks = verify_chain(lab.home, lab.tools, "web1")

    assert [c.ok for c in checks] == [True, False]
    assert checks[1].summary.startswith("disk0: content digest ")
    assert f"recorded at capture {second.disks[0].digest[:16]}" in checks[1].summary
    recorded = {p.id: (p.verification.ok, p.verification.detail) for p in lab.chain().points if p.verification}
    assert recorded == {first.id: (True, "ok"), second.id: (False, checks[1].summary)}


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_repair_rebuilds_the_hash_list_of_the_newest_point(lab: Lab, damage: str) -> None:
    lab.back_up()
    change(lab.disk, 0, random.Random(1).randbytes(BS))
    newest = lab.back_up()
    hash_list = lab.home.chain_dir("web1") / f"disk0/{newest.id}.hashes"
    intact = hash_list.read_bytes()
    if damage == "missing":
        hash_list.unlink()
    else:
        hash_list.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))

    assert "use --repair" in verify_chain(lab.home, lab.tools, "web1")[-1].summary
    assert all(c.ok for c in verify_chain(lab.home, lab.tools, "web1", repair=True))

    assert hash_list.read_bytes() == intact
    change(lab.disk, 7 * BS, b"one block")
    assert lab.back_up().disks[0].sent_bytes == BS  # the next backup is incremental again
