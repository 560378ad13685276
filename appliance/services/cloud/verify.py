# SPDX-License-Identifier: GPL-2.0-or-later
"""`cloud verify`: every object a point needs is in the bucket and opens; `--deep`: every block is read back,
checked against its id, and each disk's digest recomputed, so a damaged object is named before a restore
or a failover needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.domain.cloud import CloudPoint
from appliance.errors import CloudError, CloudObjectError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.cloud.bucket import Opened, Say, each_block, open_point, open_store
from appliance.services.cloud_reader import DiskReader, PackHeaders
from appliance.store.layout import Home

log = get_logger(__name__)


@dataclass
class VerifyReport:
    points: int = 0
    packs: int = 0
    blocks: int = 0  # blocks opened and checked (--deep)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(home: Home, tools: Tools, name: str, host: str | None = None, deep: bool = False,
           say: Say = lambda _: None) -> VerifyReport:  # fmt: skip
    """Every manifest opens, every pack it names is there with a header that opens and holds its entries;
    --deep: every block of every point is read, opened, checked against its id, and each disk's digest
    recomputed from them (the same digest `appliance verify` checks locally)."""
    opened = open_store(home, tools, name)
    report = VerifyReport()
    data = {o.key: o for o in opened.bucket.listing("data/")}
    headers = PackHeaders(opened.bucket, opened.sealer)
    for o in opened.bucket.listing("points/"):
        try:
            point = open_point(opened.sealer, o.key, opened.bucket.get(o.key, o.version))
        except CloudObjectError as exc:
            report.problems.append(str(exc))
            continue
        if host is not None and point.host != host:
            continue
        report.points += 1
        if o.hidden:
            report.warnings.append(f"manifest {o.key} ({point.host} {point.point}) is behind a delete marker")
        problems = _check_point(opened, point, data, headers, report, deep)
        report.problems += problems
        say(f"{point.host} {point.point}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    log.info("cloud.verified", store=name, host=host, deep=deep, points=report.points, problems=len(report.problems))
    return report


def _check_point(opened: Opened, point: CloudPoint, data: dict[str, Any], headers: PackHeaders,
                 report: VerifyReport, deep: bool) -> list[str]:  # fmt: skip
    problems = []
    for ref in point.packs:
        listed = data.get(ref.name)
        if listed is None:
            problems.append(f"object {ref.name} is missing ({point.host} {point.point} needs it)")
            continue
        if listed.hidden:
            report.warnings.append(f"object {ref.name} is behind a delete marker (its locked version is read)")
        if ref.version is not None and listed.version != ref.version:
            report.warnings.append(f"object {ref.name} has a newer version than the one written (ignored: "
                                   "reads ask for the version written)")  # fmt: skip
        try:
            headers.entries(ref)
            report.packs += 1
        except CloudError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    for disk in point.disks:
        try:
            reader = DiskReader(opened.bucket, opened.sealer, point, disk, headers)
            for _first, count, pack, entry in reader.map.stretches():
                if entry + count > len(headers.entries(point.packs[pack])):
                    problems.append(f"object {point.packs[pack].name} lacks entries {point.host} {point.point} needs")
            if deep and not problems:
                digest = _deep_digest(reader, report)
                if digest != disk.digest:
                    problems.append(f"{point.host} {point.point} {disk.slot}: the blocks read back do not make the "
                                    "point's digest")  # fmt: skip
        except CloudError as exc:
            problems.append(str(exc))
    return problems


def _deep_digest(reader: DiskReader, report: VerifyReport) -> str:
    def count(_: int, __: bytes, zero: bool) -> None:
        report.blocks += not zero

    return each_block(reader, count)
