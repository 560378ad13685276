# SPDX-License-Identifier: GPL-2.0-or-later
"""The busy-server table: each way of taking a point of a real Debian 12 server that writes all the time.

One boot of the server (appliance.lab.server, under TCG here), one chain; after a first full point, each
method takes its points in turn: a live read (the old default), a live read between `fsfreeze -f /` and
`fsfreeze -u /` hooks (what users did to get a consistent point), the frozen moment (the default now),
and the change-tracked incremental of a kept reader (the daemon's way; its first point, a full read by a
new reader, is not counted). A second boot puts the workload on an LVM thin volume and measures the LVM
snapshot method there next to the frozen moment. Every point is then checked as a restore would check it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from appliance import bootstrap
from appliance.domain.models import Point, format_size
from appliance.lab.server import BusyServer, build_server_image, check_point
from appliance.ports import Tools
from appliance.services.backup import back_up
from appliance.services.reader_pool import ReaderPool
from appliance.store.layout import Home

HOST = "busy"
POINTS = 2  # measured points per method


@dataclass(frozen=True)
class Method:
    name: str
    settings: tuple[str, ...]  # `appliance host set busy ...`
    tracked: bool = False


_LIVE = Method("live read (old default)", ("--consistency", "live", "--pre-hook", "", "--post-hook", ""))
_FROZEN = Method("frozen moment (default)", ("--consistency", "auto", "--pre-hook", "", "--post-hook", ""))
METHODS = (
    _LIVE,
    Method(
        "fsfreeze for the whole read",
        ("--consistency", "live", "--pre-hook", "fsfreeze -f /", "--post-hook", "fsfreeze -u /"),
    ),  # fmt: skip
    _FROZEN,
    Method("change-tracked incremental", ("--consistency", "auto", "--pre-hook", "", "--post-hook", ""), True),
)
LVM_METHODS = (
    _LIVE,
    _FROZEN,
    Method("LVM snapshot (thin)", ("--consistency", "lvm-snapshot", "--pre-hook", "", "--post-hook", "")),
)


@dataclass(frozen=True)
class Section:
    """One boot of the server: where its workload writes, and the methods measured on that disk."""

    title: str
    data_volume: str | None  # None: the root disk; thin or thick: an LVM volume of a second disk
    methods: tuple[Method, ...]


SECTIONS = (
    Section("the server's whole disk (/dev/vda, 2 GiB, the workload on its root file system)", None, METHODS),
    Section("an LVM thin volume (busyvg/thin, 256 MiB, the workload's file system)", "thin", LVM_METHODS),
)


@dataclass
class Taken:
    method: str
    point: Point
    stall: float


def run(work: Path) -> None:
    image = build_server_image(work / "server.img")
    for number, section in enumerate(SECTIONS):
        home = Home(work / f"busy-home-{number}")
        taken = _section(image, work, home, section)
        _report(home, work, section, taken)


def _section(image: Path, work: Path, home: Home, section: Section) -> list[Taken]:
    cli = [sys.executable, "-m", "appliance", "--home", str(home.root)]
    taken: list[Taken] = []
    with BusyServer(work / "vm", image, data_volume=section.data_volume) as server:
        print(f"\nbusy server: Debian 12 under TCG, sshd up in {server.boot_seconds:.0f} s; disk {server.disk}")
        subprocess.run(
            [*cli, "host", "add", HOST, "--address", server.address, "--port", str(server.ssh_port),
             "--disk", server.disk, "--key", str(server.key_file),
             "--host-key-fingerprint", server.host_key_fingerprint],
            check=True, capture_output=True,
        )  # fmt: skip
        tools = bootstrap.tools(home)
        back_up(home, tools, HOST)  # the first point: every method below is an incremental
        for method in section.methods:
            subprocess.run([*cli, "host", "set", HOST, *method.settings], check=True, capture_output=True)
            taken += _points(home, tools, server, method)
    return taken


def _points(home: Home, tools: Tools, server: BusyServer, method: Method) -> list[Taken]:
    readers = ReaderPool() if method.tracked else None
    try:
        if readers is not None:
            back_up(home, tools, HOST, pool=readers)  # a new reader reads everything once
        out = []
        for _ in range(POINTS):
            server.reset_stats()
            point = back_up(home, tools, HOST, pool=readers)
            out.append(Taken(method.name, point, server.stats().longest_stall))
            time.sleep(2)  # the workload writes between points, as between scheduled ones
        return out
    finally:
        if readers is not None:
            readers.close()


def _report(home: Home, work: Path, section: Section, taken: list[Taken]) -> None:
    print(f"\n    {section.title}")
    print(f"    {'method':30} {'s/point':>8} {'read on host':>13} {'wire':>10} {'longest stall':>14}  restored clean")
    for method in section.methods:
        mine = [t for t in taken if t.method == method.name]
        checks = [check_point(home.chain_dir(HOST) / t.point.disks[0].file, work / "scratch") for t in mine]
        seconds = sum(t.point.seconds for t in mine) / len(mine)
        read = sum(d.read_bytes for t in mine for d in t.point.disks) // len(mine)
        wire = sum(t.point.wire_bytes for t in mine) // len(mine)
        stall = max(t.stall for t in mine)
        clean = sum(c.clean for c in checks)
        kinds = ", ".join(sorted({t.point.consistency.label for t in mine if t.point.consistency}))
        print(
            f"    {method.name:30} {seconds:8.1f} {format_size(read):>13} {format_size(wire):>10} {stall:12.2f} s"
            f"  {clean}/{len(mine)}  ({kinds})"
        )
        for c in checks:
            for problem in c.problems[:3]:
                print(f"        {c.image.name}: {problem}")
