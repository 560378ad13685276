# SPDX-License-Identifier: GPL-2.0-or-later
"""remove_host --purge: refused while a point is in use; otherwise every file of the host goes, and only
the host's."""

from __future__ import annotations

import pytest

from appliance.errors import ChainError
from appliance.services.hosts import remove_host
from appliance.store import failback, hosts, recovery
from tests.unit.services.helpers import Lab, add_host


def _files(lab: Lab) -> dict[str, bytes]:
    """Every file under APPLIANCE_HOME, by its path there, with its content."""
    return {str(p.relative_to(lab.home.root)): p.read_bytes() for p in lab.home.root.rglob("*") if p.is_file()}


def test_purge_is_refused_while_a_point_is_pinned(lab: Lab) -> None:
    point = lab.back_up()
    lab.pin(point.id)
    files = lab.store_files()

    with pytest.raises(ChainError, match="in use"):
        remove_host(lab.home, "web1", purge=True)

    assert hosts.exists(lab.home, "web1") and lab.home.key_file("web1").exists()
    assert lab.store_files() == files
    assert recovery.load(lab.home, "web1") is not None


def test_purge_removes_every_file_of_the_host_and_nothing_else(lab: Lab) -> None:
    add_host(lab.home, lab.folder, "db1")
    lab.back_up("db1")
    lab.back_up()
    lab.back_up()
    lab.pin(lab.chain().points[0].id)
    recovery.remove(lab.home, "web1")  # a failover that was stopped: its folder stays
    failback.save_progress(lab.home, "web1", {"phase": "done"})
    lab.home.screenshots_dir("web1").mkdir(parents=True)
    (lab.home.screenshots_dir("web1") / "boot.png").write_bytes(b"png")
    others = {path: data for path, data in _files(lab).items() if "web1" not in path}

    remove_host(lab.home, "web1", purge=True)

    assert _files(lab) == others
    assert [p for p in lab.home.root.rglob("*") if "web1" in p.name] == []  # folders included
    assert lab.chain("db1").points and hosts.exists(lab.home, "db1")
