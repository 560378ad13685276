# SPDX-License-Identifier: GPL-2.0-or-later
"""back_up: what a point holds, and that a run that fails anywhere leaves the chain exactly as it was."""

from __future__ import annotations

import random

import pytest

from appliance.errors import ApplianceError, ChainLockedError, ConnectionLostError, ImageToolError, StoreFullError
from appliance.services.backup import BackupProgress, back_up
from appliance.services.consolidate import consolidate
from appliance.services.verify import verify_chain
from appliance.store import chains
from tests.fakes.images import padded
from tests.unit.services.helpers import BS, Lab, change, disk_content


def _blocks(data: bytes) -> list[bytes]:
    return [data[i : i + BS] for i in range(0, len(data), BS)]


def test_a_first_point_holds_the_data_blocks_and_an_incremental_exactly_the_changed_ones(lab: Lab) -> None:
    original = lab.disk.read_bytes()
    blocks = _blocks(original)
    data = [i for i, b in enumerate(blocks) if any(b)]
    empty = [i for i, b in enumerate(blocks) if not any(b)]

    first = lab.back_up()
    assert lab.content(first) == original
    assert lab.own_blocks(first) == dict.fromkeys(data, False)  # full, and sparse
    assert first.disks[0].sent_bytes == len(data) * BS

    edited, zeroed, filled = data[0], data[1], empty[0]
    change(lab.disk, edited * BS + 100, b"x")
    change(lab.disk, zeroed * BS, bytes(BS))
    change(lab.disk, filled * BS, random.Random(1).randbytes(BS))
    second = lab.back_up()

    assert lab.own_blocks(second) == {edited: False, zeroed: True, filled: False}
    assert (second.disks[0].sent_bytes, second.disks[0].changed_bytes) == (2 * BS, 3 * BS)
    assert lab.content(second) == lab.disk.read_bytes()
    assert lab.content(first) == original


def test_a_disk_that_grew_and_shrank_reads_back_at_each_size(lab: Lab) -> None:
    sizes = [(1 << 20) + 1000, (2 << 20) + 3000, (512 << 10) + 7]
    lab.disk.write_bytes(disk_content(sizes[0], seed=1))
    points, contents = [], []
    for size in sizes:
        data = lab.disk.read_bytes()[:size]
        lab.disk.write_bytes(data + disk_content(size, seed=size)[len(data) :])
        points.append(lab.back_up())
        contents.append(lab.disk.read_bytes())
    for point, content, size in zip(points, contents, sizes, strict=True):
        assert point.disks[0].size == size
        assert lab.images.virtual_size(lab.home.chain_dir("web1") / point.disks[0].file) == padded(size)
        assert lab.content(point) == content
    assert all(check.ok for check in verify_chain(lab.home, lab.tools, "web1"))


@pytest.mark.parametrize(
    ("operation", "error", "after"),
    [
        ("create", ImageToolError("qemu-img create failed"), 0),
        ("write", StoreFullError("no space left"), 1),
        ("zero", StoreFullError("no space left"), 0),
        ("flush", StoreFullError("no space left"), 0),
    ],
)
def test_a_failing_image_leaves_the_chain_exactly_as_it_was(
    lab: Lab, operation: str, error: ApplianceError, after: int
) -> None:
    rng = random.Random(2)
    change(lab.disk, 10 * BS, rng.randbytes(2 * BS))
    first = lab.back_up()
    before = lab.store_files()
    change(lab.disk, 0, rng.randbytes(2 * BS))  # two runs of data to write, and one of zeroes
    change(lab.disk, 10 * BS, bytes(2 * BS))
    change(lab.disk, 20 * BS, rng.randbytes(BS))
    lab.images.fail(operation, error, after=after)

    with pytest.raises(type(error)):
        lab.back_up()

    assert not lab.images.armed
    assert lab.store_files() == before
    assert lab.chain().ids() == {first.id}
    assert list((lab.home.run_dir / "web1").iterdir()) == []
    assert lab.content(lab.back_up()) == lab.disk.read_bytes()  # and the next run starts afresh


def test_a_cut_connection_leaves_no_point_and_no_leftovers(lab: Lab) -> None:
    first = lab.back_up()
    before = lab.store_files()
    change(lab.disk, 0, random.Random(3).randbytes(8 * BS))
    lab.shell.cut_after = 1000  # past the reader's hello, inside the first block it sends

    with pytest.raises(ConnectionLostError):
        lab.back_up()

    assert lab.store_files() == before
    assert lab.chain().ids() == {first.id}
    lab.shell.cut_after = None
    second = lab.back_up()
    assert lab.content(second) == lab.disk.read_bytes()
    assert second.disks[0].sent_bytes == 8 * BS


class _Killed(BaseException):
    """The appliance process dies here (APPLIANCE_CRASH_AT in-process: only finally blocks still run)."""


def test_files_of_a_run_killed_before_its_catalog_write_are_removed_by_the_next_job(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = lab.back_up()
    before = lab.store_files()
    change(lab.disk, 0, random.Random(4).randbytes(BS))

    def killed_at(name: str) -> None:
        if name == "capture.before_catalog":
            raise _Killed

    with monkeypatch.context() as patch, pytest.raises(_Killed):
        patch.setattr(chains, "checkpoint", killed_at)
        lab.back_up()

    renamed = set(lab.store_files()) - set(before)
    assert len(renamed) == 3 and "publishing.json" in renamed  # the point's two files and the intent
    assert lab.chain().ids() == {first.id}
    consolidate(lab.home, lab.tools, "web1", dry_run=True)  # any job on the host puts its store in order
    assert lab.store_files() == before


def test_a_second_job_on_the_host_is_refused_while_a_backup_holds_it(lab: Lab) -> None:
    refused: list[ChainLockedError] = []

    def second_jobs(_: BackupProgress) -> None:
        """Runs inside the first backup, with its point half written."""
        for job in (lambda: back_up(lab.home, lab.tools, "web1"), lambda: consolidate(lab.home, lab.tools, "web1")):
            try:
                job()
            except ChainLockedError as exc:
                refused.append(exc)

    point = back_up(lab.home, lab.tools, "web1", progress=second_jobs)

    assert refused and all("backup (pid" in str(exc) for exc in refused)
    assert lab.chain().ids() == {point.id}  # the refused jobs touched nothing of it
    assert lab.content(point) == lab.disk.read_bytes()


def test_a_snapshot_that_filled_up_is_named_with_what_to_do() -> None:
    from appliance.services.backup import _remote_failure
    from appliance.transfer.protocol import RemoteFailure

    message = "the LVM snapshot of vg0/data filled up during the read (...); the point was discarded"
    error = _remote_failure("web1", RemoteFailure("snapshot-overflow", message, {}))
    assert str(error) == f"web1: {message}; nothing was recorded"
    assert error.hint is not None and "free extents" in error.hint
