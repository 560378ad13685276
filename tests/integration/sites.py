# SPDX-License-Identifier: GPL-2.0-or-later
"""Two appliances for the offsite tests: the source (the test's home, which backs a lab host up) and a DR
appliance (a home of its own), which reaches the source only over SSH: a lab host's sshd in a network
namespace of its own, whose authorized_keys holds the key the source granted the DR site. The forced
command of that key runs this checkout's appliance on the source's home."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.lab import LabHost
from tests.conftest import points_json, run_cli


@dataclass
class Sites:
    source: Path  # the source appliance's home (its points)
    dr: Path  # the DR appliance's home
    host: LabHost  # the protected host, backed up by the source
    site: LabHost  # where the DR appliance reaches the source (sshd + the granted key)
    dr_key: Path


def two_sites(make_host, home: Path, tmp_path: Path, host: LabHost | None = None) -> Sites:  # type: ignore[no-untyped-def]
    """A host on the source (`host`, or one of 64 MiB with 40 % data), the source's sshd, and a DR home
    with a granted key."""
    host = host or make_host(size=64 << 20, data=0.4)
    site = make_host(size=1 << 20, add=False)
    dr_key = tmp_path / "dr_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dr1", "-f", str(dr_key)], check=True)
    authorized = Path(site.folder) / "authorized_keys"
    r = run_cli(home, "site", "grant", "dr1", "--key", f"{dr_key}.pub", "--authorized-keys", str(authorized))
    assert r.rc == 0, r.err
    dr = tmp_path / "dr-home"
    dr.mkdir()
    return Sites(home, dr, host, site, dr_key)


def add_site(s: Sites, name: str = "hq", address: str | None = None) -> str:
    """`site add` at the DR appliance (the source's sshd, or `address`, e.g. a relay's); returns its output."""
    r = run_cli(s.dr, "site", "add", name, "--address", address or f"root@{s.site.address}", "--key",
                str(s.dr_key), "--trust-first-use")  # fmt: skip
    assert r.rc == 0, r.err
    return r.out


def digests(home: Path, host: str) -> list[tuple[str, str]]:
    """Each point's id and first disk's digest: the same at both sites when the DR site holds the points."""
    return [(str(p["id"]), str(p["disks"][0]["digest"])) for p in points_json(home, host)]  # type: ignore[index]
