# SPDX-License-Identifier: GPL-2.0-or-later
"""`verify`: a damaged point is found and named (point and disk); the hash list can be rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from appliance.errors import ChainCorruptError
from appliance.lab import disks
from tests.conftest import points_json, run_cli
from tests.integration.helpers import chain_files


def _three_points(make_host, home: Path):  # type: ignore[no-untyped-def]
    host = make_host(size=16 << 20, data=0.4)
    for seed in range(3):
        if seed:
            disks.write_extents(host.disk, 16 << 20, 0.05, seed=seed)
        assert run_cli(home, "backup", host.name).rc == 0
    return host


def _data_offset(image: Path) -> int:
    """Where in the file one of this image's own data clusters (depth 0) lies."""
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True, check=True)
    extents = [e for e in json.loads(out.stdout) if e["depth"] == 0 and e["data"] and "offset" in e]
    return int(extents[0]["offset"])


def test_flipped_data_in_a_middle_point_is_named(make_host, home: Path) -> None:
    host = _three_points(make_host, home)
    assert run_cli(home, "verify", host.name).rc == 0
    middle = chain_files(home, host.name)[1]
    offset = _data_offset(middle)
    with open(middle, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = run_cli(home, "verify", host.name)
    assert r.rc == ChainCorruptError.exit_code
    ids = [p["id"] for p in points_json(home, host.name)]
    assert f"{ids[1]}: FAILED: disk0: content digest" in r.out
    assert f"{ids[0]}: ok" in r.out
    # the newest point reads its own clusters and the middle one's: whether it fails depends on which
    # blocks it overwrote, so only the verdicts recorded for the other two are certain
    verdicts = {p["id"]: p["verified"]["ok"] for p in points_json(home, host.name)}  # type: ignore[index]
    assert verdicts[ids[0]] is True and verdicts[ids[1]] is False
    assert "error:" in r.err and ids[1] in r.err and "Traceback" not in r.err


def test_damaged_qcow2_metadata_is_reported(make_host, home: Path) -> None:
    host = _three_points(make_host, home)
    newest = chain_files(home, host.name)[-1]
    with open(newest, "r+b") as f:
        f.write(b"\0" * 8)  # the qcow2 magic
    r = run_cli(home, "verify", host.name)
    assert r.rc == ChainCorruptError.exit_code
    newest_id = points_json(home, host.name)[-1]["id"]
    assert f"{newest_id}: FAILED: disk0:" in r.out


def test_missing_backing_file_is_reported(make_host, home: Path) -> None:
    host = _three_points(make_host, home)
    base = chain_files(home, host.name)[0]
    os.rename(base, base.with_suffix(".away"))
    r = run_cli(home, "verify", host.name)
    assert r.rc == ChainCorruptError.exit_code
    assert r.out.count("FAILED") == 3


def test_lost_hash_list_refuses_backup_until_repaired(make_host, home: Path) -> None:
    host = _three_points(make_host, home)
    newest = points_json(home, host.name)[-1]
    hashes = home / "store" / host.name / str(newest["disks"][0]["file"]).replace(".qcow2", ".hashes")  # type: ignore[index]
    hashes.unlink()
    r = run_cli(home, "backup", host.name)
    assert r.rc == ChainCorruptError.exit_code and "--repair" in r.err
    assert run_cli(home, "verify", host.name).rc == ChainCorruptError.exit_code
    assert run_cli(home, "verify", host.name, "--repair").rc == 0
    assert hashes.exists()
    disks.write_extents(host.disk, 16 << 20, 0.02, seed=9)
    r = run_cli(home, "backup", host.name)
    assert r.rc == 0, r.err
    assert points_json(home, host.name)[-1]["sent_bytes"] < (1 << 20)  # still incremental
