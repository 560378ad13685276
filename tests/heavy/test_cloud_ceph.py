# SPDX-License-Identifier: GPL-2.0-or-later
"""The cloud copy against Ceph RGW, the object store most private clouds run (appliance/lab/ceph.py).

The same scenarios as against SeaweedFS (tests/integration/test_cloud.py), run unchanged against a one-node
Ceph cluster whose radosgw enforces Object Lock: `cloud add --lock-days 1` (its canary must be refused
deletion), backup, push, change, backup, push, restore equal to the disk, attach from a fresh home,
`verify --deep`, restore again, a locked version's delete refused to the appliance's own credentials, and
`failover --from` the bucket of the lab guest. The cluster takes about 20 s to start and the run a few
minutes, so it has its own command (./install --ceph installs Ceph):

    .venv/bin/pytest -n 0 -m ceph tests/heavy/test_cloud_ceph.py
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from appliance.lab import Lab
from appliance.lab.ceph import CephStore
from tests.conftest import run_cli
from tests.integration import test_cloud as on_s3

pytestmark = pytest.mark.ceph


def test_the_appliance_user_has_least_privilege(ceph_store: CephStore) -> None:
    """The bucket's policy grants the appliance user what it needs, and not BypassGovernanceRetention."""
    bucket = f"b{secrets.token_hex(5)}"
    ceph_store.create_bucket(bucket, lock=True)
    appliance = ceph_store.client(ceph_store.appliance)
    until = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    put = appliance.put_object(Bucket=bucket, Key="g", Body=b"x", ObjectLockMode="GOVERNANCE",
                               ObjectLockRetainUntilDate=until)  # fmt: skip
    retention = appliance.get_object_retention(Bucket=bucket, Key="g", VersionId=put["VersionId"])["Retention"]
    assert retention["Mode"] == "GOVERNANCE"
    with pytest.raises(ClientError) as refused:
        appliance.delete_object(Bucket=bucket, Key="g", VersionId=put["VersionId"], BypassGovernanceRetention=True)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as foreign:
        appliance.create_bucket(Bucket=f"{bucket}x", ObjectLockEnabledForBucket=True)
    assert foreign.value.response["Error"]["Code"] == "AccessDenied"  # it may create none (--max-buckets=-1)


def test_push_restore_and_attach_from_a_fresh_home(make_host, home: Path, tmp_path: Path,
                                                    ceph_store: CephStore, lab: Lab) -> None:  # fmt: skip
    on_s3.test_push_restore_and_attach_from_a_fresh_home(make_host, home, tmp_path, ceph_store, lab)


def test_failover_from_the_bucket_on_a_new_appliance(make_host, guest_image: Path, home: Path, tmp_path: Path,
                                                      ceph_store: CephStore, lab: Lab) -> None:  # fmt: skip
    on_s3.test_failover_from_the_bucket_on_a_new_appliance(make_host, guest_image, home, tmp_path, ceph_store, lab)


def test_a_full_bucket_is_one_line_and_the_next_push_goes_on(make_host, home: Path, tmp_path: Path,
                                                             ceph_store: CephStore) -> None:  # fmt: skip
    """RGW enforces a bucket quota: the push that meets it ends with one line (exit 65), what it put counts,
    and once the quota is raised the next push sends only the rest."""
    host = make_host(size=96 << 20, data=0.5)  # about 48 MiB of data: three packs
    creds = ceph_store.appliance.write(tmp_path / "app.creds")
    bucket = f"b{secrets.token_hex(5)}"
    ceph_store.create_bucket(bucket, lock=False)
    ceph_store.radosgw_admin("quota", "set", "--bucket", bucket, "--quota-scope", "bucket", "--max-size",
                             str(20 << 20))  # fmt: skip
    ceph_store.radosgw_admin("quota", "enable", "--bucket", bucket, "--quota-scope", "bucket")
    on_s3._add(home, ceph_store, bucket, creds)  # type: ignore[arg-type]
    assert run_cli(home, "backup", host.name).rc == 0
    full = run_cli(home, "cloud", "push", "b2")
    said = [x for x in full.err.splitlines() if x.strip() and not x.startswith("20")]
    assert full.rc == 65 and "full" in said[0] and "Traceback" not in full.err, full.err
    ceph_store.radosgw_admin("quota", "set", "--bucket", bucket, "--quota-scope", "bucket", "--max-size", "-1")
    r = run_cli(home, "--log-json", "cloud", "push", "b2")
    assert r.rc == 0, r.err
    done = [json.loads(x) for x in r.err.splitlines() if '"cloud.pushed"' in x][0]
    assert done["new_blocks"] < done["blocks"], done  # the pack the full bucket took was not sent again
    restored = tmp_path / "restored.raw"
    assert run_cli(home, "cloud", "restore", "b2", host.name, "--to", str(restored)).rc == 0
    assert restored.read_bytes() == Path(host.disk).read_bytes()
