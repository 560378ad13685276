# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import hashlib

from appliance.domain.blocks import DiskDigest, block_count, block_hashes, carry_over, zero_hash


def test_block_count_and_partial_last_block() -> None:
    assert block_count(0, 4096) == 0
    assert block_count(4096, 4096) == 1
    assert block_count(4097, 4096) == 2


def test_carry_over_first_point_reads_zero() -> None:
    c = carry_over(None, 10 * 4096, 4096)
    assert (c.known, c.unknown, c.total) == (0, (), 10)


def test_carry_over_same_size_keeps_everything() -> None:
    c = carry_over(10 * 4096 + 100, 10 * 4096 + 100, 4096)
    assert (c.known, c.unknown, c.total) == (11, (), 11)


def test_carry_over_grown_disk_rewrites_old_partial_block() -> None:
    c = carry_over(10 * 4096 + 100, 20 * 4096, 4096)
    assert (c.known, c.unknown, c.total) == (10, (10,), 20)


def test_carry_over_shrunk_disk_rewrites_new_partial_block() -> None:
    c = carry_over(20 * 4096, 10 * 4096 + 512, 4096)
    assert (c.known, c.unknown, c.total) == (10, (10,), 11)


def test_digest_is_sha256_of_block_hashes() -> None:
    data = b"a" * 5000 + bytes(3000)
    hashes = block_hashes(data, 4096)
    assert hashes == hashlib.sha256(data[:4096]).digest() + hashlib.sha256(data[4096:]).digest()
    d = DiskDigest()
    d.add(hashes)
    assert d.hexdigest() == hashlib.sha256(hashes).hexdigest()
    assert block_hashes(bytes(8192), 4096) == zero_hash(4096) * 2
