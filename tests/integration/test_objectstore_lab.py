# SPDX-License-Identifier: GPL-2.0-or-later
"""The lab's S3 server (appliance/lab/objectstore.py) refuses what a real S3 with object lock refuses.

These are the facts an appliance keeping locked copies relies on, checked against the real server with the
appliance's least-privileged credentials: a compliance-locked version can neither be deleted nor have its
retention shortened, a governance lock cannot be bypassed without the permission, and a delete without a
version only hides the object behind a delete marker.
"""

from __future__ import annotations

import configparser
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from appliance.lab import Lab
from appliance.lab.objectstore import ObjectStore, S3Credentials, start_object_store


def _code(call: Callable[[], Any]) -> str:
    """The S3 error code `call` fails with."""
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def _bucket(store: ObjectStore, *, lock: bool) -> str:
    name = f"b{secrets.token_hex(4)}"
    store.create_bucket(name, lock=lock)
    return name


def _until(days: float) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


@pytest.fixture
def appliance(object_store: ObjectStore) -> Any:
    return object_store.client(object_store.appliance)


def test_compliance_lock_holds_against_the_appliance(object_store: ObjectStore, appliance: Any) -> None:
    bucket = _bucket(object_store, lock=True)
    put = appliance.put_object(
        Bucket=bucket, Key="p1", Body=b"point", ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=_until(1)
    )
    version = put["VersionId"]
    assert appliance.get_object_retention(Bucket=bucket, Key="p1", VersionId=version)["Retention"]["Mode"] == (
        "COMPLIANCE"
    )

    assert _code(lambda: appliance.delete_object(Bucket=bucket, Key="p1", VersionId=version)) == "AccessDenied"
    shorter = {"Mode": "COMPLIANCE", "RetainUntilDate": _until(0.5)}
    assert (
        _code(lambda: appliance.put_object_retention(Bucket=bucket, Key="p1", VersionId=version, Retention=shorter))
        == "AccessDenied"
    )

    longer = _until(2)
    appliance.put_object_retention(
        Bucket=bucket, Key="p1", VersionId=version, Retention={"Mode": "COMPLIANCE", "RetainUntilDate": longer}
    )
    kept = appliance.get_object_retention(Bucket=bucket, Key="p1", VersionId=version)["Retention"]
    assert kept["RetainUntilDate"] == longer

    # Without a version, a delete only stacks a delete marker: the locked version is still there.
    assert appliance.delete_object(Bucket=bucket, Key="p1")["DeleteMarker"] is True
    assert _code(lambda: appliance.get_object(Bucket=bucket, Key="p1")) == "NoSuchKey"
    assert appliance.get_object(Bucket=bucket, Key="p1", VersionId=version)["Body"].read() == b"point"


def test_governance_lock_cannot_be_bypassed_by_the_appliance(object_store: ObjectStore, appliance: Any) -> None:
    bucket = _bucket(object_store, lock=True)
    version = appliance.put_object(
        Bucket=bucket, Key="g", Body=b"g", ObjectLockMode="GOVERNANCE", ObjectLockRetainUntilDate=_until(1)
    )["VersionId"]

    def delete(client: Any, **bypass: bool) -> Any:
        return client.delete_object(Bucket=bucket, Key="g", VersionId=version, **bypass)

    assert _code(lambda: delete(appliance)) == "AccessDenied"
    assert _code(lambda: delete(appliance, BypassGovernanceRetention=True)) == "AccessDenied"
    delete(object_store.client(object_store.admin), BypassGovernanceRetention=True)  # the admin may
    assert _code(lambda: appliance.head_object(Bucket=bucket, Key="g", VersionId=version)) in ("404", "NoSuchVersion")


def test_lock_needs_a_lock_bucket_and_buckets_need_admin(object_store: ObjectStore, appliance: Any) -> None:
    plain = _bucket(object_store, lock=False)
    appliance.put_object(Bucket=plain, Key="a", Body=b"a")
    locked = lambda: appliance.put_object(  # noqa: E731
        Bucket=plain, Key="b", Body=b"b", ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=_until(1)
    )
    assert _code(locked) == "InvalidRequest"
    assert _code(lambda: appliance.create_bucket(Bucket=f"b{secrets.token_hex(4)}")) == "AccessDenied"


def test_wrong_secret_is_refused(object_store: ObjectStore) -> None:
    wrong = S3Credentials(object_store.appliance.access_key, secrets.token_hex(20))
    assert _code(lambda: object_store.client(wrong).list_buckets()) == "SignatureDoesNotMatch"


def test_credentials_file_is_private_and_usable(
    object_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = object_store.appliance.write(tmp_path / "credentials")
    assert path.stat().st_mode & 0o777 == 0o600
    ini = configparser.ConfigParser()
    ini.read(path)
    assert ini["default"]["aws_access_key_id"] == object_store.appliance.access_key
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    creds = boto3.session.Session().get_credentials()
    wanted = object_store.appliance
    assert (creds.access_key, creds.secret_key) == (wanted.access_key, wanted.secret_key)
    assert (object_store.folder / "identities.json").stat().st_mode & 0o777 == 0o600


def test_two_servers_on_the_same_ports_stay_apart(object_store: ObjectStore, tmp_path: Path) -> None:
    """Two workers' servers share /tmp and every port number: each must still store its own objects."""
    other_lab = Lab(tmp_path / "lab")
    try:
        other = start_object_store(other_lab, tmp_path / "s3")
        assert other.endpoint != object_store.endpoint
        mine, theirs = _bucket(object_store, lock=False), _bucket(other, lock=False)
        for store, bucket in ((object_store, mine), (other, theirs)):
            client = store.client(store.appliance)
            client.put_object(Bucket=bucket, Key="k", Body=bucket.encode())
            assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == bucket.encode()
        names = {b["Name"] for b in other.client(other.admin).list_buckets()["Buckets"]}
        assert mine not in names and theirs in names
        other.stop()
        assert not other.running()
        appliance = object_store.client(object_store.appliance)
        appliance.put_object(Bucket=mine, Key="after", Body=b"after")  # its filer still finds its own master
        assert appliance.get_object(Bucket=mine, Key="after")["Body"].read() == b"after"
    finally:
        other_lab.down()
