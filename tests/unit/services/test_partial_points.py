# SPDX-License-Identifier: GPL-2.0-or-later
"""The store's side of a replication cut part-way: a partial point kept for the next run, and the pin a
send to a DR site holds on the point it sends."""

from __future__ import annotations

import fcntl
import io
import json
import os

import pytest

from appliance.agent import wire
from appliance.domain.blocks import carry_over, zero_hash
from appliance.domain.models import slot_name
from appliance.store import chains
from appliance.transfer import protocol
from appliance.transfer.protocol import DataRun, ProtocolError, RecordReader
from tests.unit.services.helpers import BS, Lab


def _keep(lab: Lab, point_id: str, at: tuple[int, int]) -> None:
    newest = lab.chain().newest
    assert newest is not None
    with chains.open(lab.home, lab.images, "web1", "replication") as tx:
        draft = tx.new_point(point_id)
        files = draft.disk(slot_name(0))
        files.image.write_bytes(b"partial image")
        files.hashes.write_bytes(b"partial hashes")
        digests = {d.slot: d.digest for d in newest.disks}
        tx.keep_partial(draft, chains.Partial(point_id, "hq", newest.id, digests, *at))


def test_a_kept_partial_point_survives_the_next_jobs_until_the_chain_moves_on(lab: Lab) -> None:
    lab.back_up()
    _keep(lab, "20990101T000000Z", (0, 7))
    image, hashes = chains.ChainTx(lab.home, lab.images, "web1").partial_files("20990101T000000Z", "disk0")
    with chains.open(lab.home, lab.images, "web1", "verify") as tx:  # another job of the host: kept
        kept = tx.partial_point()
        assert kept is not None and (kept.disk, kept.block) == (0, 7)
    assert image.exists() and hashes.exists()
    lab.back_up()  # a newer point: the partial one was written on the old newest and cannot go on
    with chains.open(lab.home, lab.images, "web1", "verify") as tx:
        assert tx.partial_point() is None
    assert not image.exists() and not hashes.exists()


def test_a_partial_point_dropped_takes_its_files(lab: Lab) -> None:
    lab.back_up()
    _keep(lab, "20990101T000000Z", (1, 0))
    with chains.open(lab.home, lab.images, "web1", "replication") as tx:
        tx.drop_partial()
    with chains.open(lab.home, lab.images, "web1", "replication") as tx:
        assert tx.partial_point() is None
    assert not [f for f in (lab.home.chain_dir("web1") / "disk0").iterdir() if f.name.endswith(".part")]


def test_a_damaged_partial_record_keeps_nothing(lab: Lab) -> None:
    lab.back_up()
    _keep(lab, "20990101T000000Z", (0, 3))
    (lab.home.chain_dir("web1") / chains.PARTIAL).write_text("{not json")
    with chains.open(lab.home, lab.images, "web1", "replication"):
        pass
    assert not (lab.home.chain_dir("web1") / chains.PARTIAL).exists()
    assert not [f for f in (lab.home.chain_dir("web1") / "disk0").iterdir() if f.name.endswith(".part")]


def test_a_point_being_sent_is_held_while_its_send_lives(lab: Lab) -> None:
    point = lab.back_up()
    lab.back_up()
    tx = chains.ChainTx(lab.home, lab.images, "web1")
    with chains.sending(lab.home, lab.images, "web1", point.id, "dr1") as exports:
        assert exports.is_dir()
        assert tx.holds() == {point.id: "sending to site dr1"}
    assert tx.holds() == {}
    # A pin whose process died (no flock on it) holds nothing, and the next send removes it.
    dead = lab.home.sends_dir("web1") / "999999.pin"
    dead.write_text(json.dumps({"point": point.id, "site": "dr1"}))
    assert tx.holds() == {}
    with chains.sending(lab.home, lab.images, "web1", point.id, "dr1"):
        assert not dead.exists()


def test_a_live_pin_is_seen_from_another_open_file(lab: Lab) -> None:
    point = lab.back_up()
    pin = lab.home.sends_dir("web1") / "12345.pin"
    pin.parent.mkdir(parents=True)
    pin.write_text(json.dumps({"point": point.id, "site": "dr2"}))
    fd = os.open(pin, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a send in another process holds it
        assert chains.ChainTx(lab.home, lab.images, "web1").holds() == {point.id: "sending to site dr2"}
    finally:
        os.close(fd)


def test_old_hashes_from_a_block_on_are_what_a_resumed_pull_streams() -> None:
    size, blocks = 10 * BS, 10
    hashes = [bytes([i]) * 32 if i % 3 else zero_hash(BS) for i in range(blocks)]
    encoded = b"".join(protocol.encode_old_hashes([b"".join(hashes)], carry_over(size, size, BS), size, BS, 4))
    _, entries = wire.OldHashes(io.BytesIO(encoded)).take(blocks - 4)
    assert entries == [None if i % 3 == 0 else hashes[i][: wire.PREFIX_LEN] for i in range(4, blocks)]


def _data_record(first: int) -> bytes:
    return bytes(wire.DATA.pack(b"D", first, BS)) + b"\0" * 32 + b"\0" * BS


def test_a_resumed_disk_refuses_records_before_where_it_goes_on() -> None:
    records = RecordReader(iter([_data_record(3), b""]).__next__)
    records.start_disk(10 * BS, BS, from_block=5)
    with pytest.raises(ProtocolError, match="at block 3, after block 4"):
        records.next()
    records = RecordReader(iter([_data_record(5), b""]).__next__)
    records.start_disk(10 * BS, BS, from_block=5)
    assert isinstance(records.next(), DataRun)
