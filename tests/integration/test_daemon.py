# SPDX-License-Identifier: GPL-2.0-or-later
"""The real `appliance daemon` for a few cycles against lab hosts, stopped with SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.conftest import points_json, run_cli, start_cli


def test_daemon_backs_up_at_intervals_survives_a_dead_host_and_stops_cleanly(make_host, home: Path) -> None:
    good = make_host(size=16 << 20)
    dead = make_host(size=16 << 20)
    assert run_cli(home, "host", "set", good.name, "--interval", "3s", "--keep-last", "2").rc == 0
    assert run_cli(home, "host", "set", dead.name, "--interval", "3s", "--python", "/nonexistent/python3").rc == 0
    daemon = start_cli(home, "--log-json", "daemon")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(points_json(home, good.name)) < 3:
        time.sleep(0.5)
    daemon.send_signal(signal.SIGTERM)
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert '"event": "daemon.stopped"' in err and "Traceback" not in err
    assert len(points_json(home, good.name)) >= 3
    assert '"job.finished"' in err and "was not found" in err  # the dead host failed, every time, alone
    sched = run_cli(home, "schedule")
    assert sched.rc == 0
    rows = {line.split()[1]: line for line in sched.out.splitlines()[1:] if line.startswith("backup")}
    assert "ok: point" in rows[good.name] and "verified ok" in rows[good.name]
    assert "FAILED" in rows[dead.name]
    # the nightly consolidation with --keep-last 2, run by hand here
    assert run_cli(home, "consolidate").rc == 0  # every host; the dead one has no points yet
    assert len(points_json(home, good.name)) == 2
