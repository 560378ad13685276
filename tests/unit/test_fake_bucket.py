# SPDX-License-Identifier: GPL-2.0-or-later
"""FakeBucket's own test helpers (tests/fakes/bucket.py): its failures fire when armed and once, a request
that failed is counted as the adapter counts it, and tamper, start_upload and the clock do what use-case
tests need. What the port does is held to SeaweedFS by tests/integration/test_bucket_contract.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from appliance.errors import CloudAccessError, CloudError, CloudFullError, CloudLockError, CloudObjectError
from appliance.ports import ObjectLock, ObjectStorage
from tests.fakes import FakeBucket


def test_a_put_fails_once_after_the_calls_that_succeed() -> None:
    bucket: ObjectStorage = FakeBucket()
    assert isinstance(bucket, FakeBucket)
    bucket.fail("put", CloudFullError("bucket fake is over its quota"), after=2)
    assert bucket.armed == {"put"}
    bucket.put("data/p0", b"0")
    bucket.put("data/p1", b"1")
    with pytest.raises(CloudFullError, match="quota"):
        bucket.put("data/p2", b"2")  # a push cut at its third pack
    assert bucket.armed == set()
    assert [o.key for o in bucket.listing("data/")] == ["data/p0", "data/p1"]  # the cut pack is not there
    bucket.put("data/p2", b"2")  # once: the next push goes on
    assert bucket.keys() == ["data/p0", "data/p1", "data/p2"]
    assert bucket.requests["put_object"] == 4  # the refused request counted, as the adapter counts it


def test_an_applied_failure_takes_effect_and_loses_the_answer() -> None:
    """A pack the bucket stored whose acknowledgement never came: what prune must find unrecorded."""
    bucket = FakeBucket()
    bucket.fail("put", CloudError("S3 put_object of data/p0 failed: connection reset"), applied=True)
    with pytest.raises(CloudError, match="connection reset"):
        bucket.put("data/p0", b"pack")
    (listed,) = bucket.listing("data/")
    assert bucket.get("data/p0", listed.version) == b"pack"
    v = bucket.put("data/p1", b"x")
    bucket.fail("delete", CloudError("timed out"), applied=True)
    with pytest.raises(CloudError):
        bucket.delete("data/p1", v)
    assert bucket.versions("data/p1") == []


def test_each_operation_is_armed_on_its_own() -> None:
    bucket = FakeBucket()
    v = bucket.put("data/p", b"0123456789")
    bucket.fail("get", CloudObjectError("object data/p is missing"), after=1)
    bucket.fail("get_tail", CloudError("read broke off"))
    with pytest.raises(CloudError, match="broke off"):
        bucket.get_tail("data/p", v, 4)
    assert bucket.get("data/p", v, 0, 2) == b"01"
    with pytest.raises(CloudObjectError):
        bucket.get("data/p", v)
    assert bucket.get("data/p", v) == b"0123456789"
    assert bucket.requests["get_object"] == 4


@pytest.mark.parametrize(
    ("operation", "op"),
    [
        ("listing", "list_object_versions"),
        ("versions", "list_object_versions"),
        ("abort_uploads", "list_multipart_uploads"),
    ],
)
def test_a_failed_listing_counts_no_page(operation: str, op: str) -> None:
    bucket = FakeBucket()
    bucket.start_upload("data/cut")
    bucket.fail(operation, CloudAccessError("refused"))
    calls = {"listing": lambda: bucket.listing(""), "versions": lambda: bucket.versions("k"),
             "abort_uploads": bucket.abort_uploads}  # fmt: skip
    with pytest.raises(CloudAccessError):
        calls[operation]()
    assert bucket.requests[op] == 0
    calls[operation]()
    assert bucket.requests[op] == 1
    assert bucket.abort_uploads() == (0 if operation == "abort_uploads" else 1)


def test_unknown_operations_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        FakeBucket().fail("put_object", CloudError("x"))


def test_tamper_changes_bytes_without_a_request_or_a_lock() -> None:
    bucket = FakeBucket()
    v = bucket.put("data/p", b"sealed", ObjectLock("COMPLIANCE", datetime.now(UTC) + timedelta(days=1)))
    bucket.tamper("data/p", b"seaLed", version=v)
    assert bucket.get("data/p", v) == b"seaLed"
    assert dict(bucket.requests) == {"put_object": 1, "get_object": 1}
    with pytest.raises(CloudObjectError):
        bucket.tamper("data/none", b"x")


def test_locks_end_by_the_buckets_clock() -> None:
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    bucket = FakeBucket(clock=lambda: now[0])
    v = bucket.put("points/p", b"p", ObjectLock("GOVERNANCE", now[0] + timedelta(days=30)))
    with pytest.raises(CloudLockError):
        bucket.delete("points/p", v)
    now[0] += timedelta(days=31)
    bucket.delete("points/p", v)
    assert bucket.keys() == []


def test_credentials_can_be_taken_away() -> None:
    bucket = FakeBucket()
    bucket.put("k", b"k")
    bucket.wrong_credentials = True
    with pytest.raises(CloudAccessError):
        bucket.get("k")
    bucket.wrong_credentials = False
    assert bucket.get("k") == b"k"
