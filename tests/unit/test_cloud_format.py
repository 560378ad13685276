# SPDX-License-Identifier: GPL-2.0-or-later
"""The cloud copy's layout and sealing (domain/cloud.py, transfer/sealed.py), and the Object Lock canary's
logic against a bucket that lets a locked object go (services/cloud/setup.py)."""

from __future__ import annotations

import hashlib
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.domain.cloud import (
    ZERO,
    BlockMap,
    CloudDisk,
    CloudPoint,
    LayoutError,
    PackRef,
    lock_until,
    needs_extension,
)
from appliance.errors import CloudLockError
from appliance.ports import ObjectLock, StoredObject
from appliance.services.cloud import setup as cloud_setup
from appliance.transfer.sealed import (
    KeyFile,
    PackWriter,
    Sealer,
    SealError,
    new_key,
    open_header,
    open_manifest,
    seal_manifest,
)


def test_block_map_runs_round_trip_and_stay_small() -> None:
    rng = random.Random(3)
    m = BlockMap(10_000)
    for b in range(2_000, 9_000):  # one pack written in order
        m.put(b, 0, b - 2_000)
    for b in rng.sample(range(10_000), 50):  # scattered changes in a second pack
        m.put(b, 1, b)
    runs = m.runs()
    back = BlockMap.from_runs(runs, 10_000, 2)
    assert list(back.packs) == list(m.packs) and list(back.entries) == list(m.entries)
    assert len(runs) < 120 * 20  # grows with the scattered changes, not with the disk
    assert back.get(0) == (ZERO, 0)


def test_block_map_refuses_runs_outside_the_disk_or_its_packs() -> None:
    m = BlockMap(10)
    m.put(9, 0, 0)
    with pytest.raises(LayoutError):
        BlockMap.from_runs(m.runs(), 9, 1)
    with pytest.raises(LayoutError):
        BlockMap.from_runs(m.runs(), 10, 0)
    with pytest.raises(LayoutError):
        BlockMap.from_runs(b"\x00" * 7, 10, 1)


def test_locks_are_extended_once_a_generation() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    until = lock_until(now, 30)
    assert not needs_extension(until, now + timedelta(days=9), 30)
    assert needs_extension(until, now + timedelta(days=11), 30)
    assert needs_extension(None, now, 30)


def _sealer() -> Sealer:
    return Sealer(new_key(), "store1")


def test_a_block_opens_only_as_itself_with_its_key() -> None:
    s = _sealer()
    plain = os.urandom(1000) + bytes(31_768)
    block_id = s.block_id(hashlib.sha256(plain).digest())
    sealed = s.seal_block(block_id, plain)
    assert len(sealed) < len(plain)  # zeroes compress before sealing
    assert s.open_block(block_id, sealed, len(plain)) == plain
    tampered = bytearray(sealed)
    tampered[20] ^= 1
    with pytest.raises(SealError):
        s.open_block(block_id, bytes(tampered), len(plain))
    other_id = s.block_id(hashlib.sha256(b"other").digest())
    with pytest.raises(SealError):
        s.open_block(other_id, sealed, len(plain))  # served as another block
    with pytest.raises(SealError):
        Sealer(new_key(), "store1").open_block(block_id, sealed, len(plain))  # another store's key
    assert block_id != hashlib.sha256(plain).digest()  # the id says nothing without the key


def test_a_pack_header_names_its_blocks_and_is_bound_to_its_object() -> None:
    s = _sealer()
    w = PackWriter(s)
    blocks = [os.urandom(32 << 10) for _ in range(3)]
    ids = [s.block_id(hashlib.sha256(b).digest()) for b in blocks]
    for i, b in zip(ids, blocks, strict=True):
        w.add(i, b)
    body = w.finish("data/aa")
    entries = open_header(s, "data/aa", len(body), body)
    assert [e.block_id for e in entries] == ids
    e = entries[1]
    assert s.open_block(e.block_id, body[e.offset : e.offset + e.length], 32 << 10) == blocks[1]
    with pytest.raises(SealError):
        open_header(s, "data/bb", len(body), body)  # a header moved to another object's name


def test_a_manifest_round_trips_and_refuses_another_store() -> None:
    s = _sealer()
    now = datetime.now(UTC)
    point = CloudPoint("web1", "p1", now, now, {"vm_cpus": 2}, "frozen", (PackRef("data/aa", "v1", 123),),
                       (CloudDisk("disk0", 65536, 32768, "d" * 64, BlockMap(2).runs()),))  # fmt: skip
    assert open_manifest(s, seal_manifest(s, point)) == point
    with pytest.raises(SealError):
        open_manifest(Sealer(new_key(), "store2"), seal_manifest(s, point))


def test_the_key_file_and_the_words_carry_the_key() -> None:
    key = KeyFile("store1", new_key(), "b2", "https://s3.example.com", "bucket", "us-east-1")
    assert KeyFile.loads(key.dumps()) == key
    words = cloud_setup.key_words(key.key)
    assert len(words.split()) == 24 and cloud_setup.key_from_words(words) == key.key
    with pytest.raises(SealError):
        KeyFile.loads('{"format": "something else"}')


class _LeakyBucket:
    """A bucket that takes a lock and then lets the locked version be deleted anyway."""

    requests: dict[str, int] = {}

    def put(self, key: str, data: bytes, lock: ObjectLock | None = None) -> str | None:
        return "v1"

    def delete(self, key: str, version: str | None) -> None:
        return None

    def listing(self, prefix: str) -> list[StoredObject]:
        return []


def test_a_bucket_that_deletes_a_locked_object_is_refused() -> None:
    with pytest.raises(CloudLockError, match="does not enforce Object Lock"):
        cloud_setup._prove_lock(_LeakyBucket(), "b", 30, "COMPLIANCE")  # type: ignore[arg-type]


def test_credentials_files(tmp_path: Path) -> None:
    ini = tmp_path / "c.ini"
    ini.write_text("[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    ini.chmod(0o600)
    assert cloud_setup.read_credentials(ini) == ("AK", "SK")
    line = tmp_path / "c.line"
    line.write_text("AK:SK\n")
    line.chmod(0o600)
    assert cloud_setup.read_credentials(line) == ("AK", "SK")


@pytest.mark.parametrize(
    ("code", "status", "op", "error"),
    [
        ("QuotaExceeded", 403, "put_object", "CloudFullError"),
        ("InsufficientStorage", 507, "put_object", "CloudFullError"),
        ("NoSuchKey", 404, "get_object", "CloudObjectError"),
        ("NoSuchBucket", 404, "get_object", "CloudAccessError"),
        ("SignatureDoesNotMatch", 403, "list_object_versions", "CloudAccessError"),
        ("AccessDenied", 403, "delete_object", "CloudLockError"),
        ("InvalidRequest", 400, "put_object", "CloudLockError"),
        ("SlowDown", 503, "put_object", "CloudError"),  # what is left after boto3's own retries
    ],
)
def test_s3_errors_become_the_appliances(code: str, status: int, op: str, error: str) -> None:
    from botocore.exceptions import ClientError

    from appliance.adapters.s3 import S3Bucket
    from appliance.ports import BucketAccess

    bucket = S3Bucket(BucketAccess("http://127.0.0.1:9", "b", "us-east-1", "AK", "SK"))
    exc = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)
    made = bucket._error(op, "data/x", exc)
    assert type(made).__name__ == error
    assert "SK" not in str(made) and "SK" not in repr(bucket.access)  # the secret is never said
