# SPDX-License-Identifier: GPL-2.0-or-later
"""The failback's block ledgers: what recorded data says each block holds, and what stays unknown."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.domain.blocks import block_hashes
from appliance.store.ledger import ENTRY, Ledger, differing_blocks, entries, prefixes

BS = 4096
SIZE = 10 * BS + 1000  # a last, short block


def _disk(seed: int) -> bytes:
    return bytes((i * seed + i // 7) % 251 for i in range(SIZE))


def _truth(disk: bytes) -> bytes:
    return prefixes(block_hashes(disk, BS))


def test_data_in_any_alignment_leaves_exactly_the_partly_covered_blocks_unknown(tmp_path: Path) -> None:
    disk = bytearray(_disk(3))
    ledger = Ledger(tmp_path / "l", SIZE, BS)
    ledger.record_data(0, disk)
    assert b"".join(entries(ledger.path)) == _truth(bytes(disk)) and not ledger.unknown
    disk[BS + 10 : 3 * BS + 20] = os.urandom(2 * BS + 10)
    ledger.record_data(BS + 10, disk[BS + 10 : 3 * BS + 20])
    assert ledger.unknown == {1, 3}
    ledger.record_data(BS, disk[BS : 2 * BS])
    ledger.record_data(3 * BS, disk[3 * BS : 4 * BS])
    assert not ledger.unknown and b"".join(entries(ledger.path)) == _truth(bytes(disk))


def test_the_last_short_block_is_whole_when_data_reaches_the_end(tmp_path: Path) -> None:
    disk = bytearray(_disk(5))
    ledger = Ledger(tmp_path / "l", SIZE, BS)
    ledger.record_data(0, disk)
    disk[10 * BS :] = bytes(1000)
    ledger.record_zeroes(10 * BS, 1000)
    assert not ledger.unknown and b"".join(entries(ledger.path)) == _truth(bytes(disk))
    ledger.record_zeroes(2 * BS + 1, 5)  # inside one block
    assert ledger.unknown == {2}


def test_differing_blocks_names_them(tmp_path: Path) -> None:
    a, b = Ledger(tmp_path / "a", SIZE, BS), Ledger(tmp_path / "b", SIZE, BS)
    disk = _disk(7)
    a.record_data(0, disk)
    b.record_data(0, disk)
    assert differing_blocks(entries(a.path), entries(b.path)) == (0, [])
    b.set_entries(4, b"\0" * ENTRY * 2)
    assert differing_blocks(entries(a.path), entries(b.path)) == (2, [4, 5])


def test_a_points_full_hash_list_compares_with_a_ledger(tmp_path: Path) -> None:
    disk = _disk(11)
    ledger = Ledger(tmp_path / "l", SIZE, BS)
    ledger.record_data(0, disk)
    (tmp_path / "point.hashes").write_bytes(block_hashes(disk, BS))
    assert differing_blocks(entries(ledger.path), entries(tmp_path / "point.hashes", 32)) == (0, [])
