# SPDX-License-Identifier: GPL-2.0-or-later
"""A compromised host cannot harm the appliance: a hostile reader (hostile_reader.py), shipped over the same
SSH path as the real one, breaks the wire format; each run ends with one clear line, publishes nothing and
keeps the appliance's memory flat."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from appliance.errors import JobDeadlineError, ProtocolViolationError
from appliance.lab import Lab
from tests.conftest import Result, points_json, run_cli
from tests.integration.helpers import host_add, store_state
from tests.integration.test_failures import _one_clear_line

HOSTILE = Path(__file__).with_name("hostile_reader.py")
RSS_LIMIT = 200 << 20  # a record claims 4 GiB and the host sends 512 MiB after it: none of it may be buffered


def _hostile_host(make_host, home: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A lab host with one good point, then the hostile reader as its interpreter: the host, the mode file and
    the wrapper (the interpreter)."""
    host = make_host(size=4 << 20)
    assert run_cli(home, "backup", host.name).rc == 0
    mode = tmp_path / "mode"
    wrapper = tmp_path / "hostile-python"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/python3 {shlex.quote(str(HOSTILE))} {shlex.quote(str(mode))} "$@"\n')
    wrapper.chmod(0o755)
    # A small disk and a high minimum rate: the deadline is 10 s + one timeout (5 s) + 4 MiB at 1 GiB/s.
    r = run_cli(home, "host", "set", host.name, "--python", str(wrapper), "--timeout", "5", "--min-rate", "1G")
    assert r.rc == 0, r.err
    return host, mode, wrapper


def _backup_measured(home: Path, host: str) -> tuple[Result, int]:
    """`appliance backup HOST` as a child process: its result and its peak RSS in bytes (killed after 120 s).

    The peak is GNU time's (%M): a process's own peak RSS (ru_maxrss) starts from its parent's when it is
    forked, and survives the exec, so measured straight from this test process it would be this process's
    peak, hundreds of MiB late in a long run; time's is a few MiB."""
    with tempfile.TemporaryDirectory() as folder:
        out, err, peak = (Path(folder) / name for name in ("out", "err", "peak"))
        argv = ["/usr/bin/time", "-f", "%M", "-o", str(peak),
                sys.executable, "-m", "appliance", "--home", str(home), "backup", host]  # fmt: skip
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(argv, stdout=o, stderr=e, start_new_session=True)
            guard = threading.Timer(120, os.killpg, (proc.pid, signal.SIGKILL))
            guard.start()
            proc.wait()
            guard.cancel()
        kib = int(peak.read_text().split()[-1])
        return Result(proc.returncode, out.read_text(), err.read_text()), kib * 1024


def test_hostile_records_end_with_one_line_and_nothing_published(
    make_host, lab: Lab, home: Path, tmp_path: Path
) -> None:
    host, mode, wrapper = _hostile_host(make_host, home, tmp_path)
    before = store_state(home, host.name)
    cases = {
        "garbage": "a record of unknown type 'W' before the hello",
        "huge-json": "a hello record of 4294967295 bytes",
        "huge-data": "a data record of 4294967295 bytes",
        "block-past-end": "past the disk's end",
        "huge-count": "a zero record of blocks 0..4294967294 past the disk's end",
        "zero-past-end": "past the disk's end",
        "step-back": "a data record at block 2, after block 3 was sent",
        "lying": "data for blocks from 0 that does not match the hashes sent with it",
        "huge-disk": "is 100.0 TiB on the host, more than its limit of 64.0 TiB",
    }
    for name, needle in cases.items():
        mode.write_text(name)
        r, rss = _backup_measured(home, host.name)
        _one_clear_line(r, ProtocolViolationError.exit_code, needle)
        assert store_state(home, host.name) == before, name
        assert rss < RSS_LIMIT, (name, rss >> 20)
    mode.write_text("garbage")  # the probe of `host add` reads the same records
    r = run_cli(home, *host_add(host, lab.key_file, "--trust-first-use", "--python", str(wrapper), name="again"))
    _one_clear_line(r, ProtocolViolationError.exit_code, "unknown type 'W'")
    assert run_cli(home, "host", "set", host.name, "--python", "python3").rc == 0
    assert run_cli(home, "backup", host.name).rc == 0
    assert len(points_json(home, host.name)) == 2
    assert not [p for p in (home / "store" / host.name).rglob("*.part")]


def test_a_trickle_ends_at_the_job_deadline(make_host, home: Path, tmp_path: Path) -> None:
    """One byte every 2 s: never silent for the 5 s timeout, so only the deadline (about 15 s) ends it."""
    host, mode, _ = _hostile_host(make_host, home, tmp_path)
    before = store_state(home, host.name)
    mode.write_text("trickle")
    r, _ = _backup_measured(home, host.name)
    _one_clear_line(r, JobDeadlineError.exit_code, "passed its deadline of 15 s", "minimum rate of 1.0 GiB/s")
    assert store_state(home, host.name) == before
