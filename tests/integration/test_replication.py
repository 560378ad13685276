# SPDX-License-Identifier: GPL-2.0-or-later
"""Offsite copies: a DR appliance (its own APPLIANCE_HOME) pulls a host's points from the source appliance,
which it reaches only over SSH, with a key the source granted nothing but `serve-replica`.

The source appliance's sshd is a lab host's (a network namespace of its own); its forced command runs
this checkout's appliance on the source's home.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

from appliance.bench.replication import text_like
from appliance.lab import Lab
from tests.conftest import points_json, run_cli, start_cli
from tests.integration.sites import Sites, add_site
from tests.integration.sites import digests as _digests


def _add_site(s: Sites) -> None:
    assert s.host.name in add_site(s)


def test_a_dr_site_pulls_every_point_and_then_only_what_changed(sites: Sites, lab: Lab) -> None:
    s, name = sites, sites.host.name
    assert run_cli(s.source, "backup", name).rc == 0
    lab.change(name, 0.05, seed=3)
    assert run_cli(s.source, "backup", name).rc == 0
    _add_site(s)
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc == 0, r.err
    assert f"{name}: 2 point(s) pulled from hq" in r.out
    assert _digests(s.dr, name) == _digests(s.source, name)
    v = run_cli(s.dr, "verify", name)
    assert v.rc == 0, v.out + v.err
    lag = run_cli(s.dr, "replicas")
    assert lag.rc == 0 and any(line.split()[:2] == [name, "hq"] and line.split()[4] == "0" for line in
                               lag.out.splitlines()), lag.out + lag.err  # fmt: skip

    written = lab.change(name, 0.01, seed=4)
    assert run_cli(s.source, "backup", name).rc == 0
    r = run_cli(s.dr, "replicate", "hq", name)
    assert r.rc == 0, r.err
    assert _digests(s.dr, name) == _digests(s.source, name)
    b = run_cli(s.dr, "backup", name)
    assert b.rc != 0 and "replica of site hq" in b.err, b.err
    newest = points_json(s.dr, name)[-1]
    assert newest["wire_bytes"] <= written * 1.5 + (256 << 10), (newest["wire_bytes"], written)  # type: ignore[operator]
    assert newest["extra"]["origin"].startswith("replica of hq")  # type: ignore[index]
    again = run_cli(s.dr, "replicate", "hq")
    assert again.rc == 0 and f"{name}: 0 point(s) pulled" in again.out, again.out + again.err

    # Retention at the source while the DR site lags: the point the DR site holds is kept (older ones and
    # newer ones go), and the next point is sent as the blocks that differ from it.
    held = _digests(s.dr, name)[-1][0]
    for seed in (5, 6):
        lab.change(name, 0.01, seed=seed)
        assert run_cli(s.source, "backup", name).rc == 0
    assert run_cli(s.source, "host", "set", name, "--keep-last", "1").rc == 0
    plan = run_cli(s.source, "consolidate", name, "--dry-run")
    assert "held: replication to site dr1" in plan.out, plan.out
    assert run_cli(s.source, "consolidate", name).rc == 0
    left = [p for p, _ in _digests(s.source, name)]
    assert len(left) == 2 and left[0] == held, left
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc == 0 and f"{name}: 1 point(s) pulled" in r.out, r.out + r.err
    assert _digests(s.dr, name)[-1] == _digests(s.source, name)[-1]
    assert points_json(s.dr, name)[-1]["wire_bytes"] <= 3 * written + (256 << 10)  # type: ignore[operator]


def test_the_granted_key_runs_nothing_but_serve_replica(sites: Sites) -> None:
    s = sites
    ssh = ["ssh", "-i", str(s.dr_key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{s.site.address}"]  # fmt: skip
    for command in (["id"], ["sh", "-c", "cat /etc/shadow"], ["rm", "-rf", str(s.source)]):
        done = subprocess.run([*ssh, *command], input=b"", capture_output=True, timeout=60, check=False)
        assert b"uid=" not in done.stdout and b"root:" not in done.stdout, done.stdout
    assert (s.source / "hosts" / f"{s.host.name}.json").exists()
    # The protocol itself: a host or point outside the catalog is refused, never a path.
    body = json.dumps({"op": "point", "host": "../hosts", "point": "x", "base": None}).encode()
    done = subprocess.run([*ssh, "serve-replica"], input=len(body).to_bytes(4, "little") + body,
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    assert done.stdout[:1] == b"X" and b"no host" in done.stdout, done.stdout
    pty = subprocess.run([*ssh, "-t", "-t", "id"], input=b"", capture_output=True, timeout=60, check=False)
    assert b"uid=" not in pty.stdout


def test_a_point_damaged_on_the_source_is_refused_at_the_dr_site(sites: Sites) -> None:
    s, name = sites, sites.host.name
    assert run_cli(s.source, "backup", name).rc == 0
    point = points_json(s.source, name)[-1]
    image = s.source / "store" / name / str(point["disks"][0]["file"])  # type: ignore[index]
    _corrupt_a_data_cluster(image)
    _add_site(s)
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc != 0 and "does not match" in r.err, r.err
    assert points_json(s.dr, name) == []


def _corrupt_a_data_cluster(image: Path) -> None:
    """Flip a byte inside the first data cluster qemu-img map reports for the image itself."""
    done = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True, check=True)
    extent = next(e for e in json.loads(done.stdout) if e.get("data") and "offset" in e and e.get("depth", 0) == 0)
    with open(image, "r+b") as f:
        f.seek(extent["offset"] + 100)
        byte = f.read(1)
        f.seek(extent["offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_the_dr_daemon_replicates_each_site_at_its_interval_and_a_dead_site_stops_no_other(
    sites: Sites,
    make_host,
    lab: Lab,  # type: ignore[no-untyped-def]
) -> None:
    s, name = sites, sites.host.name
    assert run_cli(s.source, "backup", name).rc == 0
    _add_site(s)
    dead = make_host(size=1 << 20, add=False)  # a second source site that then goes away
    authorized = Path(dead.folder) / "authorized_keys"
    assert run_cli(s.source, "site", "grant", "dr1", "--key", f"{s.dr_key}.pub", "--authorized-keys",
                   str(authorized)).rc == 0  # fmt: skip
    r = run_cli(s.dr, "site", "add", "gone", "--address", f"root@{dead.address}", "--key", str(s.dr_key),
                "--trust-first-use")  # fmt: skip
    assert r.rc == 0, r.err
    subprocess.run(["kill", Path(dead.sshd_pid_file).read_text().strip()], check=True)
    for site in ("hq", "gone"):
        r = run_cli(s.dr, "site", "set", site, "--every", "2s", "--bandwidth", "50M", "--window", "")
        assert r.rc == 0 and "50.0 MiB/s, every 2s" in r.out, r.out + r.err
    night = f"{datetime.now() + timedelta(hours=12):%H:%M}"
    daemon = start_cli(s.dr, "--log-json", "daemon", "--consolidate-at", night)
    try:
        _wait_for(lambda: len(points_json(s.dr, name)) == 1 if (s.dr / "hosts" / f"{name}.json").exists() else False)
        lab.change(name, 0.02, seed=9)
        assert run_cli(s.source, "backup", name).rc == 0
        _wait_for(lambda: _digests(s.dr, name) == _digests(s.source, name))
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 0 and "Traceback" not in err, err
    rows = {tuple(line.split()[:2]): line for line in run_cli(s.dr, "schedule").out.splitlines()[1:]}
    assert " ok: " in rows[("replicate", "hq")] and " FAILED: " in rows[("replicate", "gone")], rows
    lag = run_cli(s.dr, "replicas")
    assert lag.rc == 0, lag.err
    assert any(line.split()[:2] == [name, "hq"] and line.split()[4] == "0" and " ok" in line
               for line in lag.out.splitlines()), lag.out  # fmt: skip
    assert any(line.split()[:2] == ["-", "gone"] and "UNREACHABLE" in line for line in lag.out.splitlines()), lag.out


def _wait_for(condition, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_compressible_changes_cross_the_wire_compressed_and_arrive_proven(sites: Sites) -> None:
    s, name = sites, sites.host.name
    assert run_cli(s.source, "backup", name).rc == 0
    _add_site(s)
    assert run_cli(s.dr, "replicate", "hq").rc == 0
    text = text_like(4 << 20, seed=5)
    with open(s.host.disk, "r+b") as disk:
        disk.seek(8 << 20)
        disk.write(text)
        os.fsync(disk.fileno())
    assert run_cli(s.source, "backup", name).rc == 0
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc == 0, r.err
    assert _digests(s.dr, name) == _digests(s.source, name)
    assert points_json(s.dr, name)[-1]["wire_bytes"] < len(text) // 2  # type: ignore[operator]
