# SPDX-License-Identifier: GPL-2.0-or-later
"""The block pipeline's one comparison: what a sink lacks, as runs of data and of zeroes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.domain.blocks import PREFIX_LEN, Change, block_hashes, carry_over, changed_runs, zero_hash
from appliance.services.image_reader import Chunk
from appliance.services.pipeline import PreviousHashes, copy_changes

BS = 4096


def _hashes(*blocks: bytes) -> bytes:
    return b"".join(hashlib.sha256(b).digest() for b in blocks)


def test_only_what_differs_is_a_change_in_runs_of_one_kind() -> None:
    a, b, z = b"a" * BS, b"b" * BS, bytes(BS)
    hashes = _hashes(a, a, z, z, b, a)
    held = [
        hashlib.sha256(a).digest()[:PREFIX_LEN],  # the same: not sent
        None,  # unknown: sent whatever it is
        None,
        hashlib.sha256(b).digest(),  # a full hash works as well as a prefix
        hashlib.sha256(a).digest()[:PREFIX_LEN],
        zero_hash(BS)[:PREFIX_LEN],
    ]
    assert changed_runs(10, hashes, held, 100 * BS, BS) == [
        Change(11, 1, zero=False),
        Change(12, 2, zero=True),
        Change(14, 2, zero=False),
    ]


def test_a_short_last_block_is_zero_by_its_own_length() -> None:
    size = 2 * BS + 100
    hashes = _hashes(b"x" * BS, bytes(BS), bytes(100))
    assert changed_runs(0, hashes, [None, None, None], size, BS) == [Change(0, 1, False), Change(1, 2, True)]


class _Sink:
    def __init__(self) -> None:
        self.puts: list[tuple[str, int, int]] = []

    def put_data(self, offset: int, data: bytes | memoryview, first: int, hashes: bytes) -> None:
        assert block_hashes(bytes(data), BS) == hashes
        self.puts.append(("data", offset, len(data)))

    def put_zeroes(self, offset: int, length: int, first: int, count: int) -> None:
        self.puts.append(("zero", offset, length))


def test_a_copy_puts_what_the_previous_point_lacks(tmp_path: Path) -> None:
    old = [b"a" * BS, b"b" * BS, b"c" * BS]
    hash_list = tmp_path / "old.hashes"
    hash_list.write_bytes(_hashes(*old))
    size = 5 * BS  # the disk grew by two blocks: they read as zeroes in the new overlay
    new = [b"a" * BS, b"B" * BS, bytes(BS), b"d" * BS, bytes(BS)]
    data = b"".join(new)
    held = PreviousHashes(hash_list, carry_over(3 * BS, size, BS), size, BS)
    sink, seen = _Sink(), []
    try:
        copied = copy_changes([Chunk(0, size, data, block_hashes(data, BS))], held, sink, size, BS, seen=seen.append)
    finally:
        held.close()
    assert sink.puts == [("data", BS, BS), ("zero", 2 * BS, BS), ("data", 3 * BS, BS)]
    assert (copied.data, copied.zeroed, copied.changed) == (2 * BS, BS, 3 * BS) and len(seen) == 1


def test_a_chunk_that_reads_as_zeroes_is_put_as_zeroes(tmp_path: Path) -> None:
    size = 4 * BS
    hash_list = tmp_path / "old.hashes"
    hash_list.write_bytes(_hashes(b"a" * BS, bytes(BS), b"a" * BS, bytes(BS)))
    held = PreviousHashes(hash_list, carry_over(size, size, BS), size, BS)
    sink = _Sink()
    try:
        copy_changes([Chunk(0, size, None, zero_hash(BS) * 4)], held, sink, size, BS)
    finally:
        held.close()
    assert sink.puts == [("zero", 0, BS), ("zero", 2 * BS, BS)]
