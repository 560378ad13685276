# SPDX-License-Identifier: GPL-2.0-or-later
"""The ImageTool contract, run against QEMU (QemuImages) and against the unit tests' FakeImages, so the
fake cannot drift from what qemu-img and qemu-storage-daemon do (restic's backend test suite)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.adapters.images import QemuImages
from appliance.errors import ChainCorruptError
from appliance.ports import ImageTool
from tests.conftest import require
from tests.fakes import FakeImages

K = 1024
CLUSTER = 64 * K
BASE_SIZE = 1024 * K
TOP_SIZE = 2048 * K


@pytest.fixture(params=["qemu", "fake"])
def images(request: pytest.FixtureRequest) -> ImageTool:
    if request.param == "fake":
        return FakeImages()
    require("qemu-img")
    require("qemu-storage-daemon")
    return QemuImages()


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _runs(extents: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Extents with touching neighbours of a kind joined (qemu-img map splits them where the host
    offsets of the clusters are not contiguous, which says nothing about the image's content)."""
    out: list[tuple[int, int, bool]] = []
    for start, length, zero in sorted(extents):
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] == zero:
            out[-1] = (out[-1][0], out[-1][1] + length, zero)
        else:
            out.append((start, length, zero))
    return out


class Chain:
    """base <- top in tmp_path, written through exports, and what each must read as."""

    def __init__(self, images: ImageTool, folder: Path) -> None:
        self.images = images
        self.folder = folder
        self.base, self.top = folder / "base.qcow2", folder / "top.qcow2"
        self.run_dir = folder / "run"
        images.create(self.base, BASE_SIZE, cluster_size=CLUSTER)
        self.base_view = bytearray(BASE_SIZE)
        self.write(self.base, self.base_view, 0, _noise(2 * CLUSTER, 1))
        self.write(self.base, self.base_view, 4 * CLUSTER, _noise(CLUSTER, 2))
        images.create(self.top, TOP_SIZE, "base.qcow2", cluster_size=CLUSTER)
        self.top_view = self.base_view + bytearray(TOP_SIZE - BASE_SIZE)

    def write(self, image: Path, view: bytearray, offset: int, data: bytes) -> None:
        with self.images.export(image, self.run_dir, writable=True) as exported:
            exported.write(offset, data)
            exported.flush()
        view[offset : offset + len(data)] = data

    def zero(self, image: Path, view: bytearray, offset: int, length: int) -> None:
        with self.images.export(image, self.run_dir, writable=True) as exported:
            exported.zero(offset, length)
            exported.flush()
        view[offset : offset + length] = bytes(length)

    def read(self, image: Path, *, backing: bool = True) -> bytes:
        size = self.images.virtual_size(image)
        with self.images.export(image, self.run_dir, writable=False, backing=backing) as exported:
            return exported.read(0, size)

    def write_top(self) -> None:
        """A whole cluster, part of a cluster the base holds (copied up), a zero cluster over the base's
        data, part of a cluster zeroed, and data past the base's end."""
        self.write(self.top, self.top_view, CLUSTER, _noise(CLUSTER, 3))
        self.write(self.top, self.top_view, 4 * CLUSTER + 8 * K, _noise(4 * K, 4))
        self.zero(self.top, self.top_view, 0, CLUSTER)
        self.zero(self.top, self.top_view, CLUSTER + 16 * K, 4 * K)
        self.write(self.top, self.top_view, BASE_SIZE + CLUSTER, _noise(CLUSTER, 5))


@pytest.fixture
def chain(images: ImageTool, tmp_path: Path) -> Chain:
    return Chain(images, tmp_path)


def test_an_overlay_reads_as_its_backing_file_then_zeroes_past_its_end(chain: Chain) -> None:
    assert chain.read(chain.top) == chain.top_view
    assert chain.images.own_extents(chain.top) == []


def test_writes_to_an_overlay_read_back_and_leave_its_backing_file_as_it_was(chain: Chain) -> None:
    chain.write_top()
    assert chain.read(chain.top) == chain.top_view
    assert chain.read(chain.base) == chain.base_view
    assert _runs(chain.images.own_extents(chain.top)) == [
        (0, CLUSTER, True), (CLUSTER, CLUSTER, False), (4 * CLUSTER, CLUSTER, False),
        (BASE_SIZE + CLUSTER, CLUSTER, False),
    ]  # fmt: skip
    own = chain.read(chain.top, backing=False)
    assert own[4 * CLUSTER : 5 * CLUSTER] == chain.top_view[4 * CLUSTER : 5 * CLUSTER]  # copied up whole
    assert own[2 * CLUSTER : 4 * CLUSTER] == bytes(2 * CLUSTER)  # not held: zeroes without the backing file


def test_zero_extents_are_what_reads_as_zeroes_through_the_chain(chain: Chain) -> None:
    chain.write_top()
    zero = [(start, length, True) for start, length in chain.images.map_zero_extents(chain.top)]
    assert _runs(zero) == [
        (0, CLUSTER, True), (2 * CLUSTER, 2 * CLUSTER, True), (5 * CLUSTER, BASE_SIZE - 4 * CLUSTER, True),
        (BASE_SIZE + 2 * CLUSTER, TOP_SIZE - BASE_SIZE - 2 * CLUSTER, True),
    ]  # fmt: skip


def test_info_chain_names_the_backing_file_by_relative_path_and_format(chain: Chain) -> None:
    top, base = chain.images.info_chain(chain.top)
    assert (top["filename"], top["virtual-size"], top["backing-filename"], top["backing-filename-format"]) == (
        str(chain.top), TOP_SIZE, "base.qcow2", "qcow2",
    )  # fmt: skip
    assert (Path(base["filename"]).resolve(), base["virtual-size"], base.get("backing-filename")) == (
        chain.base.resolve(), BASE_SIZE, None,
    )  # fmt: skip


def test_commit_writes_the_overlays_own_clusters_into_its_backing_file(chain: Chain) -> None:
    chain.write_top()
    chain.images.commit(chain.top)
    assert chain.images.virtual_size(chain.base) == TOP_SIZE  # grown to the overlay's size
    assert chain.read(chain.base) == chain.top_view
    assert chain.read(chain.top) == chain.top_view
    chain.images.check(chain.base)


def test_flatten_gives_a_standalone_image_of_what_the_chain_reads_as(chain: Chain) -> None:
    chain.write_top()
    alone = chain.folder / "alone.qcow2"
    chain.images.flatten(chain.top, alone)
    (info,) = chain.images.info_chain(alone)
    assert info.get("backing-filename") is None and info["virtual-size"] == TOP_SIZE
    assert chain.read(alone) == chain.top_view
    assert chain.images.map_zero_extents(alone)[0][0] == 0  # what reads as zeroes is no data


def test_resize_shrinks_and_keeps_what_is_left(chain: Chain) -> None:
    chain.images.resize(chain.base, BASE_SIZE // 2)
    assert chain.images.virtual_size(chain.base) == BASE_SIZE // 2
    assert chain.read(chain.base) == chain.base_view[: BASE_SIZE // 2]


def test_a_file_that_is_no_image_fails_check(images: ImageTool, tmp_path: Path) -> None:
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + _noise(4096, 6))
    with pytest.raises(ChainCorruptError):
        images.check(junk)
