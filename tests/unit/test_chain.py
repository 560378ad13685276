# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from appliance.domain.chain import Chain
from appliance.domain.models import DiskPoint, Point, parse_address, point_id_for, validate_host_name
from appliance.errors import ConfigError, PointNotFoundError


def _point(pid: str, moment: datetime) -> Point:
    return Point(pid, moment, 1.0, (DiskPoint("disk0", "/dev/sda", f"disk0/{pid}.qcow2", 10, 4096, "x"),))


def test_find_by_id_time_and_latest() -> None:
    a = _point("20261124T140000Z", datetime(2026, 11, 24, 14, 0, tzinfo=UTC))
    b = _point("20261124T150000Z", datetime(2026, 11, 24, 15, 0, tzinfo=UTC))
    chain = Chain("web1", (a, b))
    assert chain.find("latest") is b
    assert chain.find("2026-11-24T14:00:00Z") is a
    assert chain.find("20261124T150000Z") is b
    assert chain.depth(b) == 2
    with pytest.raises(PointNotFoundError):
        chain.find("2026-11-24T16:00:00Z")
    with pytest.raises(PointNotFoundError):
        Chain("web1").find("latest")


def test_point_ids_are_unique_within_a_second() -> None:
    moment = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)
    first = point_id_for(moment, set())
    assert first == "20261124T140000Z"
    assert point_id_for(moment, {first}) == "20261124T140000Z-2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("root@10.0.0.5", ("root", "10.0.0.5", 22)),
        ("10.0.0.5", ("root", "10.0.0.5", 22)),
        ("backup@web1:2222", ("backup", "web1", 2222)),
        ("root@[fe80::1]:22", ("root", "fe80::1", 22)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, str, int]) -> None:
    assert parse_address(text, None) == expected


@pytest.mark.parametrize("bad", ["root@", "a b@host", "root@host;rm -rf /", "root@host:99999"])
def test_parse_address_refuses_garbage(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(bad, None)


@pytest.mark.parametrize("bad", ["", "Web1", "-x", "a/b", "x" * 64])
def test_host_names(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_host_name(bad)
