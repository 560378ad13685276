# SPDX-License-Identifier: GPL-2.0-or-later
"""The real `appliance daemon` for a few cycles against lab hosts, stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import points_json, run_cli, start_cli


def test_daemon_backs_up_beside_a_hung_host_and_stops_cleanly(make_host, home: Path, tmp_path: Path) -> None:
    good = make_host(size=16 << 20)
    hung = make_host(size=16 << 20)
    started, release = tmp_path / "started", tmp_path / "release"
    python = tmp_path / "hanging-python"  # the hung host's python: waits to be released, then is "not found"
    python.write_text(
        f"#!/bin/sh\ntouch {started}\nfor i in $(seq 1200); do [ -e {release} ] && exit 127; sleep 0.1; done\n"
    )
    python.chmod(0o755)
    assert run_cli(home, "host", "set", good.name, "--interval", "3s", "--keep-last", "2").rc == 0
    assert (
        run_cli(home, "host", "set", hung.name, "--interval", "3s", "--python", str(python), "--timeout", "600").rc == 0
    )
    night = f"{datetime.now() + timedelta(hours=12):%H:%M}"  # no consolidation during the test
    daemon = start_cli(home, "--log-json", "daemon", "--consolidate-at", night)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(points_json(home, good.name)) < 3:
            time.sleep(0.5)
        rows = _backup_rows(home)
        assert started.exists() and rows[hung.name].endswith(" -")  # its first backup is still running, and
        assert len(points_json(home, good.name)) >= 3  # the other host was backed up at its interval meanwhile
        daemon.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            daemon.wait(timeout=2)  # stopping: waits for the hung host's job, never cuts it short
        release.touch()
        _, err = daemon.communicate(timeout=60)
    finally:
        release.touch()
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err
    assert '"event": "daemon.stopped"' in err and "Traceback" not in err
    rows = _backup_rows(home)
    assert "ok: point" in rows[good.name] and "verified ok" in rows[good.name]
    assert "FAILED" in rows[hung.name] and "was not found" in rows[hung.name]
    # the nightly consolidation with --keep-last 2, run by hand here
    assert run_cli(home, "consolidate").rc == 0  # every host; the hung one has no points yet
    assert len(points_json(home, good.name)) == 2


def _backup_rows(home: Path) -> dict[str, str]:
    sched = run_cli(home, "schedule")
    assert sched.rc == 0, sched.err
    return {line.split()[1]: line for line in sched.out.splitlines()[1:] if line.startswith("backup")}
