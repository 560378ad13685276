# SPDX-License-Identifier: GPL-2.0-or-later
"""Replication over a link that breaks: cut at random bytes, the DR appliance killed at spread-out moments,
two pulls of one host at once. The DR site reaches the source site through a relay of the tests' own
(appliance/lab/relay.py) that can cut the link at a chosen byte; everything else is as in
test_replication.py (two homes, the source's real sshd and granted key).

A pull that was cut goes on from the last block it kept (`chains.Partial`): the bytes of all the runs
together stay about those of one uncut run, the point appears only whole, and at the end both sites hold
the same points (same digests) and `verify` passes at the DR site.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.agent import wire
from appliance.lab import Lab
from appliance.lab.relay import Relay
from appliance.services.replicate import CHECKPOINT_BYTES
from tests.conftest import points_json, run_cli, start_cli
from tests.integration.helpers import host_add
from tests.integration.sites import Sites, add_site, digests

SESSION = 256 << 10  # what one run costs besides the point: SSH's handshake, the catalog, the hashes sent


@pytest.fixture
def relay(sites: Sites) -> Iterator[Relay]:
    r = Relay((sites.site.address, 22))
    yield r
    r.close()


def _replicated_once(s: Sites, relay: Relay) -> None:
    """The host's first point backed up and replicated whole through the relay (not cut)."""
    assert run_cli(s.source, "backup", s.host.name).rc == 0
    add_site(s, address=f"root@127.0.0.1:{relay.port}")
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc == 0, r.err


def _pulled(s: Sites, relay: Relay, held_before: list[tuple[str, str]] | None = None) -> int:
    """A `replicate` that finishes: the DR site then holds the source's points (after `held_before`, its
    points of an older chain) and `verify` passes there. Returns the bytes it took from the source."""
    before = relay.downstream
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc == 0, r.err
    assert digests(s.dr, s.host.name) == (held_before or []) + digests(s.source, s.host.name)
    v = run_cli(s.dr, "verify", s.host.name)
    assert v.rc == 0, v.out + v.err
    return relay.downstream - before


def _partial(s: Sites) -> Path:
    return s.dr / "store" / s.host.name / "partial.json"


def test_a_pull_cut_at_random_bytes_goes_on_from_the_last_block_it_kept(
    sites: Sites,
    relay: Relay,
    lab: Lab,
) -> None:
    s, name = sites, sites.host.name
    _replicated_once(s, relay)
    written = lab.change(name, 0.3, seed=11)
    assert run_cli(s.source, "backup", name).rc == 0
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    before, runs = relay.downstream, 0
    for _ in range(3):
        at = rng.randrange(3 * wire.MAX_RUN // 2, written // 4)  # at least one record arrives whole
        relay.cut_after(at)
        r = run_cli(s.dr, "replicate", "hq")
        runs += 1
        assert r.rc != 0 and "Traceback" not in r.err, (seed, at, r.out, r.err)
        assert _partial(s).exists(), (seed, at, r.err)
        assert len(points_json(s.dr, name)) == 1, (seed, at)  # nothing half-published
    relay.cut_after(None)
    _pulled(s, relay)
    assert not _partial(s).exists()
    total = relay.downstream - before
    # Each cut loses at most the record it cut through (the reader's MAX_RUN), besides the session's cost.
    assert total <= written * 1.05 + runs * wire.MAX_RUN + (runs + 1) * SESSION, (seed, total, written)


def test_the_dr_appliance_killed_at_spread_out_moments_keeps_its_chain_and_the_next_run_goes_on(
    sites: Sites,
    relay: Relay,
    lab: Lab,
) -> None:
    """Killed before anything was kept, right after a block was kept, and again in the run that went on
    from there: each time the chain is as it was, what was kept only grows, and the last run sends only
    the rest."""
    s, name = sites, sites.host.name
    _replicated_once(s, relay)
    written = lab.change(name, 0.3, seed=12)
    assert run_cli(s.source, "backup", name).rc == 0
    kept = []
    for moment in ("capture.data:2", "replica.kept:1", "replica.kept:2"):
        r = run_cli(s.dr, "replicate", "hq", env={"APPLIANCE_CRASH_AT": moment})
        assert r.rc == -9, (moment, r.rc, r.err)
        assert len(points_json(s.dr, name)) == 1, moment
        if _partial(s).exists():
            at = json.loads(_partial(s).read_text())
            kept.append((at["disk"], at["block"]))
    assert len(kept) >= 2 and kept == sorted(kept) and kept[-1] > kept[-2], kept
    last = _pulled(s, relay)
    assert last <= written - 2 * CHECKPOINT_BYTES + SESSION, (last, written)


def test_a_slow_pull_refuses_a_second_one_and_holds_up_no_backup_at_the_source(sites: Sites, lab: Lab) -> None:
    """While a pull crawls over a slow link: a second pull of the host refuses (one transfer of a host at a
    time); at the source the host's backups go on, and the point being sent is held from merging."""
    s, name = sites, sites.host.name
    slow = Relay((s.site.address, 22), per_chunk=0.06)
    try:
        _replicated_once(s, slow)
        lab.change(name, 0.3, seed=13)
        assert run_cli(s.source, "backup", name).rc == 0
        sending = digests(s.source, name)[-1]
        first = start_cli(s.dr, "replicate", "hq")
        sends = s.source / "run" / ".sends" / name
        deadline = time.monotonic() + 60
        while not list(sends.glob("*.pin")) if sends.exists() else True:
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = run_cli(s.dr, "replicate", "hq")
        lab.change(name, 0.01, seed=14)
        backup = run_cli(s.source, "backup", name)
        assert run_cli(s.source, "host", "set", name, "--keep-last", "1").rc == 0
        plan = run_cli(s.source, "consolidate", name, "--dry-run")
        still_sending = first.poll() is None
        out, err = first.communicate(timeout=300)
    finally:
        slow.close()
    assert second.rc != 0 and f"{name} is busy" in second.err and "Traceback" not in second.err, second.err
    assert backup.rc == 0, backup.err
    assert still_sending and "sending to site dr1" in plan.out, plan.out
    assert first.returncode == 0, err
    assert digests(s.dr, name)[-1] == sending


def test_a_full_dr_store_publishes_nothing_and_the_next_run_goes_on_once_there_is_room(
    sites: Sites,
    relay: Relay,
    lab: Lab,
) -> None:
    s, name = sites, sites.host.name
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs", str(s.dr)], check=True)
    try:
        _replicated_once(s, relay)
        written = lab.change(name, 0.3, seed=15)
        assert run_cli(s.source, "backup", name).rc == 0
        # Room for half of the change: the lab's data varies with the host's name, so the size is set here.
        stat = os.statvfs(s.dr)
        used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        room = (used + written // 2) // (1 << 20) + 1
        subprocess.run(["mount", "-o", f"remount,size={room}m", str(s.dr)], check=True)
        full = run_cli(s.dr, "replicate", "hq")
        assert full.rc != 0 and "full" in full.err and "Traceback" not in full.err, full.err
        assert len(points_json(s.dr, name)) == 1
        subprocess.run(["mount", "-o", "remount,size=160m", str(s.dr)], check=True)
        went_on = _pulled(s, relay)
        assert went_on < written, (went_on, written)
    finally:
        subprocess.run(["umount", "-l", str(s.dr)], check=False)


def test_a_source_chain_started_anew_is_pulled_on_top_of_what_the_dr_site_holds(
    sites: Sites,
    relay: Relay,
    lab: Lab,
) -> None:
    """The source's host removed with its points and added again (a new base): the DR site keeps every
    point it had (its own retention drops them), and the new chain's points arrive as the blocks that
    differ from what the DR site holds (it sends its hashes: the source no longer has that point)."""
    s, name = sites, sites.host.name
    _replicated_once(s, relay)
    old = digests(s.dr, name)
    assert run_cli(s.source, "host", "remove", name, "--purge").rc == 0
    assert run_cli(s.source, *host_add(s.host, lab.key_file, "--trust-first-use")).rc == 0
    written = lab.change(name, 0.05, seed=16)
    assert run_cli(s.source, "backup", name).rc == 0
    pulled = _pulled(s, relay, held_before=old)
    assert pulled < written * 1.5 + SESSION, (pulled, written)


def test_a_point_the_source_cannot_send_any_more_is_skipped_and_the_next_one_pulled(
    sites: Sites,
    relay: Relay,
    lab: Lab,
) -> None:
    s, name = sites, sites.host.name
    assert run_cli(s.source, "backup", name).rc == 0
    lab.change(name, 0.05, seed=17)
    assert run_cli(s.source, "backup", name).rc == 0
    older = points_json(s.source, name)[0]
    (s.source / "store" / name / "disk0" / f"{older['id']}.hashes").unlink()  # as if no DR site had needed it
    add_site(s, address=f"root@127.0.0.1:{relay.port}")
    r = run_cli(s.dr, "replicate", "hq")
    assert r.rc == 0 and "1 point(s) pulled" in r.out and "1 skipped" in r.out, r.out + r.err
    assert [p for p, _ in digests(s.dr, name)] == [str(points_json(s.source, name)[1]["id"])]
    assert digests(s.dr, name)[-1] == digests(s.source, name)[-1]
