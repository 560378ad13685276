# SPDX-License-Identifier: GPL-2.0-or-later
"""Where things live under APPLIANCE_HOME.

$APPLIANCE_HOME/
  hosts/<host>.json             the protected host's record (address, pinned key, disks, hooks)
  keys/<host>                   the private key the appliance uses for that host (0600)
  store/<host>/chain.json       the chain's catalog: a point exists once it is listed here
  store/<host>/lock             held by the one job working on that host
  store/<host>/disk0/<id>.qcow2 one qcow2 file per point and disk; backing file = previous point's
  store/<host>/disk0/<id>.hashes  block hashes of the newest point (what the next incremental compares to)
  failover/<host>/              a recovery VM's record (vm.json), overlays and console log
  failback/<host>.json          a failback's progress (and its .cutover request, its .target-key.json)
  screenshots/<host>/           boot verification screenshots
  sites/<site>.json             another appliance this one replicates from (keys/site-<site>: its key)
  granted/<site>.json           a DR site granted `serve-replica` here, and the newest point of each host
                                it confirmed holding (kept from merging, with the hash lists after it)
  cloud/<store>/                a cloud store (S3 bucket) this appliance pushes points to: its record,
                                credentials and key (0600), and an index of what the bucket holds
  alerts/                       alert channels (their secrets in files of their own, 0600), incidents, outbox
  schedule.json, accel.json     what the scheduler last ran; what failover learnt of KVM here
  run/                          sockets and FUSE export files of running jobs

Every path of a host goes through `Home`, which refuses a name that is not a host name: no command can be
given a name (`../hosts/web1`) that reaches outside the host's own files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.domain.models import validate_host_name
from appliance.store.files import private_dir


@dataclass(frozen=True, slots=True)
class Home:
    root: Path

    @property
    def hosts_dir(self) -> Path:
        return self.root / "hosts"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def host_record(self, name: str) -> Path:
        return self.hosts_dir / f"{validate_host_name(name)}.json"

    def key_file(self, name: str) -> Path:
        return self.keys_dir / validate_host_name(name)

    def failback_key_file(self, name: str) -> Path:
        """The key a failback of host `name` logs in to its target with, when it is not the host's own."""
        return self.keys_dir / f"{validate_host_name(name)}.failback"

    def chain_dir(self, name: str) -> Path:
        return self.store_dir / validate_host_name(name)

    def sends_dir(self, name: str) -> Path:
        """Sends of host `name`'s points to DR sites under way: each one's pin and exports (apart from the
        host's run folder, which the next job of the host empties)."""
        return self.run_dir / ".sends" / validate_host_name(name)

    @property
    def failovers_dir(self) -> Path:
        return self.root / "failover"

    def failover_dir(self, name: str, purpose: str = "failover") -> Path:
        base = self.failovers_dir / validate_host_name(name)
        return base if purpose == "failover" else base / purpose

    def screenshot(self, name: str, point_id: str) -> Path:
        return self.screenshots_dir(name) / f"{point_id}.png"

    def screenshots_dir(self, name: str) -> Path:
        return self.root / "screenshots" / validate_host_name(name)

    @property
    def failback_dir(self) -> Path:
        return self.root / "failback"

    def failback_file(self, name: str, suffix: str) -> Path:
        """failback/<host><suffix>: `.json` (progress), `.cutover` (request), `.target-key.json` (pinned key)."""
        return self.failback_dir / f"{validate_host_name(name)}{suffix}"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    def site_record(self, name: str) -> Path:
        return self.sites_dir / f"{validate_host_name(name)}.json"

    def grant_record(self, name: str) -> Path:
        """granted/<site>.json: a DR site this appliance granted `serve-replica`, and what it confirmed."""
        return self.root / "granted" / f"{validate_host_name(name)}.json"

    def site_key_file(self, name: str) -> Path:
        return self.keys_dir / f"site-{validate_host_name(name)}"

    @property
    def clouds_dir(self) -> Path:
        return self.root / "cloud"

    def cloud_dir(self, name: str) -> Path:
        """cloud/<store>/: a cloud store's record, secrets and index (store/cloud.py)."""
        return self.clouds_dir / validate_host_name(name)

    @property
    def alerts_dir(self) -> Path:
        """alerts/: the alert channels, their secrets (0600), the incidents and the outbox (store/alerts.py)."""
        return self.root / "alerts"

    @property
    def accel_file(self) -> Path:
        return self.root / "accel.json"

    def ensure(self) -> Home:
        for d in (self.root, self.hosts_dir, self.keys_dir, self.store_dir, self.run_dir):
            private_dir(d)
        return self


def point_file(slot: str, point_id: str) -> str:
    """A point's qcow2 file, relative to the host's chain folder."""
    return f"{slot}/{point_id}.qcow2"


def hashes_file(slot: str, point_id: str) -> str:
    return f"{slot}/{point_id}.hashes"


def partial(relative: str) -> str:
    """The name a file has while it is being written: hidden, and never listed in the catalog."""
    folder, _, name = relative.rpartition("/")
    return f"{folder}/.{name}.part" if folder else f".{name}.part"
