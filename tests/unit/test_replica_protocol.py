# SPDX-License-Identifier: GPL-2.0-or-later
"""The replication wire format and the grant line: what a hostile peer or a bad key file cannot do."""

from __future__ import annotations

import io
import json

import pytest

from appliance.errors import ConfigError
from appliance.services.replicate import grant_line
from appliance.transfer import replica
from appliance.transfer.protocol import ProtocolError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2cR2QF3pLuxKQu3z8n9pD0n0Wq2VgqJqgJbbSg0m6y dr1@example"


def _point(point_id: str = "20261126T070000Z", slot: str = "disk0") -> dict[str, object]:
    return {
        "id": point_id, "created": "2026-11-26T07:00:00+00:00", "seconds": 1.0, "wire_bytes": 0,
        "disks": [{"slot": slot, "source": "/dev/sda", "file": f"{slot}/{point_id}.qcow2", "size": 1 << 20,
                   "block_size": 32768, "digest": "00" * 32}],
        "verification": None, "extra": {}, "consistency": None,
    }  # fmt: skip


def _catalog(name: str = "web1", point: dict[str, object] | None = None) -> dict[str, object]:
    return {"protocol": 1, "hosts": [{"name": name, "settings": {"disks": ["/dev/sda"], "evil": 1},
                                      "points": [point or _point()]}]}  # fmt: skip


def test_a_catalog_keeps_only_the_settings_a_dr_site_needs() -> None:
    (host,) = replica.parse_catalog(_catalog(), "hq")
    assert host.name == "web1" and host.settings == {"disks": ["/dev/sda"]} and host.points[0].disks[0].size == 1 << 20


@pytest.mark.parametrize(
    "catalog",
    [
        _catalog(name="../hosts"),
        _catalog(point=_point(point_id="../../etc")),
        _catalog(point=_point(slot="disk0/../../x")),
        {"protocol": 2, "hosts": []},
        {"hosts": "web1"},
    ],
)
def test_a_catalog_naming_paths_is_refused(catalog: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        replica.parse_catalog(catalog, "hq")


def test_requests_are_bounded() -> None:
    big = (replica.MAX_REQUEST + 1).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="at most"):
        replica.read_request(io.BytesIO(big).read)
    assert replica.read_request(io.BytesIO(b"").read) is None
    body = json.dumps({"op": "catalog"}).encode()
    assert replica.read_request(io.BytesIO(len(body).to_bytes(4, "little") + body).read) == {"op": "catalog"}


def test_the_grant_line_forces_the_command_and_restricts_everything_else() -> None:
    line = grant_line("dr1", KEY, ["/usr/bin/python3", "-m", "appliance", "--home", "/var/lib/my appliance",
                                   "serve-replica", "--site", "dr1"])  # fmt: skip
    assert line.startswith("restrict,command=\"/usr/bin/python3 -m appliance --home '/var/lib/my appliance' ")
    assert line.endswith(" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2cR2QF3pLuxKQu3z8n9pD0n0Wq2VgqJqgJbbSg0m6y "
                         "appliance-site:dr1")  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        'command="/bin/sh" ' + KEY,  # options of its own
        KEY + "\n" + KEY,  # two keys
        "ssh-ed25519 not*base64",
        "",
    ],
)
def test_a_key_file_that_is_not_one_plain_key_grants_nothing(text: str) -> None:
    with pytest.raises(ConfigError):
        grant_line("dr1", text, ["appliance"])
