# SPDX-License-Identifier: GPL-2.0-or-later
"""replicate (the DR site) against serve (the source site) over the fakes: two appliance homes in
tmp_path, the source's host backed up by the real reader (LocalShell) into FakeImages, and the DR site's
`serve-replica` session mapped by its LocalShell to the source's `replica_source.serve` in a thread, with
the source's own tools. Only the use cases' public entry points are driven (the real thing, over sshd:
tests/integration/test_replication*.py)."""

from __future__ import annotations

import random
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from appliance.domain.models import Point
from appliance.errors import ConnectionLostError, ProtocolViolationError
from appliance.ports import Tools
from appliance.services import replica_source, seed
from appliance.services.consolidate import consolidate
from appliance.services.replicate import HostReport, add_site, grant, replicate
from appliance.services.verify import verify_chain
from appliance.store import catalog, chains
from appliance.store.layout import Home
from tests.fakes import HOST_KEY, FakeHypervisor, FakeImages, LocalShell
from tests.fakes.images import HEADER_SIZE
from tests.unit.services.helpers import BS, DISK_SIZE, Lab, change

SITE = "hq"  # the source site, as the DR site names it
DR = "dr1"  # the DR site, as the source granted it
MAX_RECORD = 1 << 20  # the most data one record carries (the reader's MAX_RUN)
SESSION = 16 << 10  # what a pull costs besides its blocks: the requests, the hello, the records' heads


@dataclass
class Sites:
    """A source appliance (`source`: web1 and its backups) and a DR appliance that added it as site hq."""

    source: Lab
    dr: Home
    tools: Tools  # the DR appliance's

    @property
    def shell(self) -> LocalShell:
        assert isinstance(self.tools.remote, LocalShell)
        return self.tools.remote

    def replicate(self) -> list[HostReport]:
        return replicate(self.dr, self.tools, SITE)

    def points(self, home: Home | None = None) -> tuple[Point, ...]:
        return catalog.load((home or self.dr).chain_dir("web1"), "web1").points

    def content(self, point: Point, home: Home) -> bytes:
        """A point's disk as a VM would read it, at either site."""
        disk = point.disks[0]
        with self.tools.images.export(home.chain_dir("web1") / disk.file, self.source.folder / "reads",
                                      writable=False) as exported:  # fmt: skip
            return exported.read(0, disk.size)

    def assert_same_points(self) -> None:
        """The DR site holds the source's points (from its first one on): same ids, digests and bytes."""
        here, there = self.points(), self.points(self.source.home)
        assert [(p.id, p.disks[0].digest) for p in here] == [(p.id, p.disks[0].digest) for p in there[-len(here) :]]
        for mine, theirs in zip(here, there[-len(here) :], strict=True):
            assert self.content(mine, self.dr) == self.content(theirs, self.source.home)
        assert all(check.ok for check in verify_chain(self.dr, self.tools, "web1"))

    def partial_kept(self) -> bool:
        return (self.dr.chain_dir("web1") / chains.PARTIAL).exists()


def _granted_command(source: Lab, folder: Path) -> list[str]:
    """`site grant dr1` at the source, as the CLI runs it; returns the forced command it installed."""
    public = folder / "dr1_key.pub"
    public.write_text(f"{HOST_KEY.key_type} {HOST_KEY.base64} root@dr\n")
    command = [sys.executable, "-m", "appliance", "--home", str(source.home.root), "serve-replica", "--site", DR]
    line = grant(source.home, DR, public, folder / "authorized_keys", command)
    forced = re.fullmatch(r'restrict,command="([^"]*)" .*', line)
    assert forced is not None, line
    return shlex.split(forced.group(1))


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Sites, Path]:
    """The two sites, the source not yet added at the DR site; and the key the DR site reaches it with."""
    (tmp_path / "source").mkdir()
    source = Lab.create(tmp_path / "source")
    forced = _granted_command(source, tmp_path)
    assert forced[-3:] == ["serve-replica", "--site", DR]

    def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:  # sshd runs the forced command, whatever was asked
        return replica_source.serve(source.home, source.tools, stdin, stdout, forced[-1])

    dr = Home(tmp_path / "dr").ensure()
    tools = Tools(remote=LocalShell({("serve-replica",): serve}), images=FakeImages(), hypervisor=FakeHypervisor())
    key = tmp_path / "dr1_key"
    key.write_text("not a real key: LocalShell needs none\n")
    return Sites(source, dr, tools), key


def _add_site(s: Sites, key: Path) -> None:
    site, listed = add_site(s.dr, s.tools, name=SITE, address="root@127.0.0.1", port=None, key=key,
                            fingerprint=None, trust_first_use=True)  # fmt: skip
    assert site.host_key == HOST_KEY and [h.name for h in listed] == ["web1"]


@pytest.fixture
def s(sites: tuple[Sites, Path]) -> Sites:
    """The two sites, the source added at the DR site (the source's catalog answered through the grant)."""
    pair, key = sites
    _add_site(pair, key)
    return pair


def _data_blocks(n: int, seed: int, disk: Path, start: int = 0) -> int:
    """Random data into n consecutive blocks of the disk from block `start`; returns the bytes written."""
    change(disk, start * BS, random.Random(seed).randbytes(n * BS))
    return n * BS


def test_a_first_pull_brings_every_point_oldest_first_and_a_second_nothing(s: Sites) -> None:
    src = s.source
    first = src.back_up()
    _data_blocks(3, seed=1, disk=src.disk, start=5)
    second = src.back_up()

    (report,) = s.replicate()

    assert [p.id for p in report.pulled] == [first.id, second.id] and report.skipped == []
    assert (report.newest_there, report.newest_here) == (second.id, second.id)
    assert [p.id for p in s.points()] == [first.id, second.id]
    assert [p.created for p in s.points()] == [first.created, second.created]
    s.assert_same_points()
    assert s.content(s.points()[-1], s.dr) == src.disk.read_bytes()
    assert all(str(p.extra.get("origin", "")).startswith(f"replica of {SITE}") for p in s.points())
    (again,) = s.replicate()
    assert again.pulled == [] and [p.id for p in s.points()] == [first.id, second.id]


def test_an_incremental_sends_only_the_changed_blocks(s: Sites) -> None:
    src = s.source
    src.back_up()
    s.replicate()
    written = _data_blocks(2, seed=2, disk=src.disk, start=40)
    change(src.disk, 0, b"one byte")  # a third block, changed in part
    newest = src.back_up()

    (report,) = s.replicate()

    (pulled,) = report.pulled
    assert pulled.id == newest.id
    # 3 blocks of random data and the session's records; the disk holds about 64 blocks of data
    assert written + BS <= pulled.wire_bytes <= written + BS + SESSION, pulled.wire_bytes
    assert pulled.disks[0].sent_bytes == 3 * BS
    s.assert_same_points()


def test_a_pull_cut_part_way_keeps_what_arrived_and_the_next_run_goes_on_from_there(s: Sites) -> None:
    src = s.source
    src.back_up()
    s.replicate()
    before = [p.id for p in s.points()]
    written = _data_blocks(80, seed=3, disk=src.disk)  # 2.5 MiB of changed blocks
    src.back_up()
    s.shell.cut_after = cut = 3 * written // 4

    with pytest.raises(ConnectionLostError):
        s.replicate()

    assert [p.id for p in s.points()] == before  # nothing half-published
    assert s.partial_kept()
    s.shell.cut_after = None
    (report,) = s.replicate()
    (pulled,) = report.pulled
    # what arrived whole is not sent again: the cut loses at most the record it went through
    assert pulled.wire_bytes < written, (pulled.wire_bytes, written)
    assert pulled.wire_bytes <= written - cut + MAX_RECORD + SESSION, (pulled.wire_bytes, written)
    assert not s.partial_kept()
    s.assert_same_points()


def test_a_block_damaged_at_the_source_is_refused_and_nothing_is_recorded(s: Sites) -> None:
    src = s.source
    point = src.back_up()
    damaged = min(block for block, zero in src.own_blocks(point).items() if not zero)
    with open(src.home.chain_dir("web1") / point.disks[0].file, "r+b") as image:  # FakeImages' data: after its header
        image.seek(HEADER_SIZE + damaged * BS + 100)
        byte = image.read(1)
        image.seek(-1, 1)
        image.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(ProtocolViolationError, match="does not match"):
        s.replicate()

    assert s.points() == ()
    assert not s.partial_kept()  # what arrived cannot be trusted: the next pull starts afresh
    left = [f for f in s.dr.chain_dir("web1").rglob("*") if f.is_file() and f.name not in ("lock", catalog.NAME)]
    assert left == []  # no image, hash list or hidden file of the refused point


def test_a_base_merged_away_at_the_source_is_sent_against_the_hashes_the_dr_site_streams(
    sites: tuple[Sites, Path],
) -> None:
    """The DR site holds a point (seeded by disk) that the source then merged away: the next point still
    travels as the blocks that differ from what the DR site holds."""
    s, key = sites
    src = s.source
    seeded = src.back_up()
    usb = src.folder / "usb"
    usb.mkdir()
    seed.export_host(src.home, src.tools, "web1", usb)
    _add_site(s, key)
    seed.import_seeds(s.dr, s.tools, usb, SITE)
    _data_blocks(2, seed=4, disk=src.disk, start=10)
    src.back_up()
    written = _data_blocks(3, seed=5, disk=src.disk, start=60)
    newest = src.back_up()
    src.set_host(keep_last=1)
    consolidate(src.home, src.tools, "web1")
    assert [p.id for p in s.points(src.home)] == [newest.id]  # the DR site's base is gone there

    (report,) = s.replicate()

    (pulled,) = report.pulled
    assert pulled.id == newest.id and [p.id for p in s.points()] == [seeded.id, newest.id]
    assert pulled.disks[0].sent_bytes == 5 * BS  # both points' changes, nothing else
    hashes = (DISK_SIZE // BS) * 16  # a 16-byte prefix per block, streamed by the DR site
    assert pulled.wire_bytes <= written + 2 * BS + hashes + SESSION, pulled.wire_bytes
    assert s.content(s.points()[-1], s.dr) == src.disk.read_bytes()
    assert [d.digest for d in s.points()[-1].disks] == [d.digest for d in newest.disks]
