# SPDX-License-Identifier: GPL-2.0-or-later
"""The ObjectStorage contract, run against the real adapter (S3Bucket) on a SeaweedFS bucket with Object Lock
(appliance/lab/objectstore.py, the appliance's least-privileged key) and against the unit tests' FakeBucket,
so the fake cannot drift from what a real S3 server does (as test_image_tool_contract.py holds FakeImages
to QEMU).

Where SeaweedFS answers otherwise than AWS's documentation would lead one to expect, the assertion says
so: the fake follows the server the appliance is tested against.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest

from appliance.adapters.s3 import S3Bucket
from appliance.errors import CloudAccessError, CloudError, CloudLockError, CloudObjectError
from appliance.lab.objectstore import REGION, ObjectStore
from appliance.ports import BucketAccess, ObjectLock, ObjectStorage
from tests.fakes import FakeBucket

DATA = b"0123456789"
PAGE = 1000  # S3's entries per page of a listing


class Backend(Protocol):
    def bucket(self, *, lock: bool = True) -> ObjectStorage: ...
    def wrong_credentials(self) -> ObjectStorage: ...
    def leave_upload(self, bucket: ObjectStorage, key: str) -> None: ...  # a multipart upload a cut push left
    def now(self) -> datetime: ...
    def wait(self, seconds: float) -> None: ...


class RealBackend:
    """A fresh bucket on the worker's SeaweedFS per call, reached through S3Bucket as the appliance."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def _access(self, bucket: str, secret: str | None = None) -> BucketAccess:
        who = self.store.appliance
        return BucketAccess(self.store.endpoint, bucket, REGION, who.access_key, secret or who.secret_key)

    def bucket(self, *, lock: bool = True) -> ObjectStorage:
        name = f"c{secrets.token_hex(5)}"
        self.store.create_bucket(name, lock=lock)
        return S3Bucket(self._access(name))

    def wrong_credentials(self) -> ObjectStorage:
        name = f"c{secrets.token_hex(5)}"
        self.store.create_bucket(name, lock=True)
        return S3Bucket(self._access(name, secrets.token_hex(20)))

    def leave_upload(self, bucket: ObjectStorage, key: str) -> None:
        assert isinstance(bucket, S3Bucket)
        client: Any = self.store.client(self.store.appliance)
        client.create_multipart_upload(Bucket=bucket.access.bucket, Key=key)

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeBackend:
    """FakeBuckets on a clock of the test's own (waiting costs nothing)."""

    def __init__(self) -> None:
        self.time = datetime.now(UTC)

    def now(self) -> datetime:
        return self.time

    def wait(self, seconds: float) -> None:
        self.time += timedelta(seconds=seconds)

    def bucket(self, *, lock: bool = True) -> ObjectStorage:
        return FakeBucket(object_lock=lock, clock=self.now)

    def wrong_credentials(self) -> ObjectStorage:
        return FakeBucket(wrong_credentials=True, clock=self.now)

    def leave_upload(self, bucket: ObjectStorage, key: str) -> None:
        assert isinstance(bucket, FakeBucket)
        bucket.start_upload(key)


@pytest.fixture(params=["s3", "fake"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "fake":
        return FakeBackend()
    return RealBackend(request.getfixturevalue("object_store"))


def _lock(backend: Backend, mode: str = "COMPLIANCE", **delta: float) -> ObjectLock:
    """A lock until now + delta, with a sub-second part (which the server drops)."""
    return ObjectLock(mode, backend.now() + timedelta(**delta) + timedelta(microseconds=654321))


def _second(lock: ObjectLock) -> ObjectLock:
    """The lock as the server keeps it: to the whole second."""
    return ObjectLock(lock.mode, lock.until.replace(microsecond=0))


def _raises(error: type[CloudError], call: Callable[[], object]) -> CloudError:
    """`call` raises exactly `error` (not a subclass: a CloudError that is no missing object, say)."""
    with pytest.raises(CloudError) as caught:
        call()
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    return caught.value


def _counts(bucket: ObjectStorage) -> dict[str, int]:
    return {op: n for op, n in bucket.requests.items() if n}


# -- put, get, versions ---------------------------------------------------------------------------------


def test_put_returns_a_version_and_get_reads_the_newest_or_the_one_named(backend: Backend) -> None:
    bucket = backend.bucket()
    first = bucket.put("points/p1", b"first")
    second = bucket.put("points/p1", b"second, longer")
    assert first and second and first != second
    assert bucket.get("points/p1") == b"second, longer"
    assert bucket.get("points/p1", first) == b"first"
    assert bucket.get("points/p1", second) == b"second, longer"
    assert bucket.versions("points/p1") == [second, first]  # newest first
    assert bucket.put("empty", b"") is not None and bucket.get("empty") == b""
    assert _counts(bucket) == {"put_object": 3, "get_object": 4, "list_object_versions": 1}


def test_ranged_and_tail_reads(backend: Backend) -> None:
    bucket = backend.bucket()
    v = bucket.put("data/pack", DATA)
    bucket.put("data/pack", b"a newer version over it")
    assert bucket.get("data/pack", v, 2, 5) == b"234"  # [start, end)
    assert bucket.get("data/pack", v, 0, 1) == b"0"
    assert bucket.get("data/pack", v, 7) == b"789"  # to the end
    assert bucket.get("data/pack", v, 5, 100) == b"56789"  # an end past the object: to its end
    assert bucket.get("data/pack", v, 0, len(DATA)) == DATA
    assert bucket.get_tail("data/pack", v, 3) == b"789"
    assert bucket.get_tail("data/pack", v, 100) == DATA  # longer than the object: all of it
    assert bucket.get_tail("data/pack", None, 5) == b"er it"  # the newest version's tail
    assert _counts(bucket) == {"put_object": 2, "get_object": 8}


def test_a_range_the_object_cannot_give_is_a_cloud_error_not_a_missing_object(backend: Backend) -> None:
    bucket = backend.bucket()
    v = bucket.put("data/pack", DATA)
    _raises(CloudError, lambda: bucket.get("data/pack", v, len(DATA)))  # InvalidRange: starts at the end
    _raises(CloudError, lambda: bucket.get("data/pack", v, 20, 30))  # ... or past it
    _raises(CloudError, lambda: bucket.get("data/pack", v, 3, 3))  # SeaweedFS: an empty range is InvalidRange
    _raises(CloudError, lambda: bucket.get_tail("data/pack", v, 0))  # "bytes=-0"
    e = bucket.put("data/empty", b"")
    assert bucket.get("data/empty", e) == b""
    _raises(CloudError, lambda: bucket.get("data/empty", e, 0, 4))  # no range of an empty object
    _raises(CloudError, lambda: bucket.get_tail("data/empty", e, 4))
    # The adapter asks end=0 as "bytes=0--1", no valid range: the server ignores it and sends everything
    # (get(key, v, s, s) is b"" nowhere: the whole object for s == 0, InvalidRange above).
    assert bucket.get("data/pack", v, 0, 0) == DATA


def test_a_missing_key_or_version_is_a_cloud_object_error(backend: Backend) -> None:
    bucket = backend.bucket()
    bucket.put("a", b"a")
    gone = bucket.put("a", b"a, then deleted")
    bucket.delete("a", gone)
    other = bucket.put("b", b"b")
    lock = _lock(backend, days=1)
    for call in (
        lambda: bucket.get("nope"),
        lambda: bucket.get("a", gone),  # a version deleted
        lambda: bucket.get("a", other),  # another key's version
        lambda: bucket.get("a/", None),  # a prefix of keys is no key
        lambda: bucket.get_tail("nope", None, 1),
        lambda: bucket.get_tail("a", gone, 1),
        lambda: bucket.lock_of("nope", None),
        lambda: bucket.lock_of("a", gone),
        lambda: bucket.lock_of("a", other),
        lambda: bucket.extend_lock("nope", None, lock),
        lambda: bucket.extend_lock("a", gone, lock),
    ):
        _raises(CloudObjectError, call)
    bucket.delete("a", gone)  # a version that is not there: no error, nothing changes
    bucket.delete("a", other)  # (another key's version is not this key's)
    assert (bucket.get("a"), bucket.get("b", other)) == (b"a", b"b")
    assert bucket.versions("nope") == [] and bucket.listing("nope") == []


# -- listing, delete markers ----------------------------------------------------------------------------


def test_listing_by_prefix_gives_each_keys_newest_version(backend: Backend) -> None:
    bucket = backend.bucket()
    older = bucket.put("points/b", b"22")
    a = bucket.put("points/a", b"1")
    x = bucket.put("data/x", b"xxxx")
    bucket.put("pointsX", b"55555")
    newer = bucket.put("points/b", b"333")
    listed = bucket.listing("points/")
    assert [(o.key, o.version, o.size, o.hidden) for o in listed] == [
        ("points/a", a, 1, False), ("points/b", newer, 3, False),
    ]  # fmt: skip
    now = backend.now()
    for o in listed:
        assert o.modified.tzinfo is not None and abs(o.modified - now) < timedelta(minutes=1), o.modified
    assert [o.key for o in bucket.listing("points")] == ["points/a", "points/b", "pointsX"]  # a string prefix
    assert [(o.key, o.version) for o in bucket.listing("")][:1] == [("data/x", x)]
    assert len(bucket.listing("")) == 4 and bucket.listing("nothing/") == []
    bucket.delete("points/b", newer)  # the newest version deleted: the one under it is listed
    assert [(o.key, o.version, o.size) for o in bucket.listing("points/b")] == [("points/b", older, 2)]
    assert bucket.get("points/b") == b"22"


def test_a_delete_without_version_leaves_a_marker_that_hides_the_object(backend: Backend) -> None:
    bucket = backend.bucket()
    lock = _lock(backend, days=1)
    v = bucket.put("points/p", b"point", lock)
    bucket.delete("points/p", None)  # allowed under a lock: it deletes nothing
    _raises(CloudObjectError, lambda: bucket.get("points/p"))
    _raises(CloudObjectError, lambda: bucket.get_tail("points/p", None, 2))
    assert bucket.get("points/p", v) == b"point"  # read by version, as the appliance reads
    assert [(o.version, o.size, o.hidden) for o in bucket.listing("points/")] == [(v, 5, True)]
    first_marker = bucket.versions("points/p")[1]
    assert bucket.versions("points/p") == [v, first_marker]
    _raises(CloudObjectError, lambda: bucket.get("points/p", first_marker))  # SeaweedFS: NoSuchKey (AWS: 405)
    assert bucket.lock_of("points/p", None) is None  # the key's newest entry is the marker, not locked
    assert bucket.lock_of("points/p", v) == _second(lock)

    bucket.delete("points/p", first_marker)  # a marker deleted by its version: the object is back
    assert bucket.get("points/p") == b"point"
    assert [(o.version, o.hidden) for o in bucket.listing("points/")] == [(v, False)]
    assert bucket.versions("points/p") == [v]

    w = bucket.put("points/p", b"newer")
    bucket.delete("points/p", None)
    marker1 = bucket.versions("points/p")[2]
    bucket.delete("points/p", None)
    versions = bucket.versions("points/p")
    assert versions[:2] == [w, v] and versions[3] == marker1 and len(set(versions)) == 4  # versions, then markers
    assert [(o.version, o.hidden) for o in bucket.listing("points/")] == [(w, True)]

    bucket.delete("ghost", None)  # a key never written: a marker alone, which no listing shows
    assert len(bucket.versions("ghost")) == 1 and bucket.listing("ghost") == []
    _raises(CloudObjectError, lambda: bucket.get("ghost"))


# -- Object Lock ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["COMPLIANCE", "GOVERNANCE"])
def test_a_locked_version_cannot_be_deleted_nor_its_lock_shortened(backend: Backend, mode: str) -> None:
    """GOVERNANCE as the appliance's key sees it: it may not bypass, so it holds as COMPLIANCE does."""
    bucket = backend.bucket()
    lock = _lock(backend, mode, days=1)
    v = bucket.put("data/p", b"pack", lock)
    assert bucket.lock_of("data/p", v) == _second(lock)  # kept to the second
    assert bucket.lock_of("data/p", None) == _second(lock)  # the newest version's

    _raises(CloudLockError, lambda: bucket.delete("data/p", v))
    _raises(CloudLockError, lambda: bucket.extend_lock("data/p", v, ObjectLock(mode, lock.until - timedelta(hours=1))))
    other = "GOVERNANCE" if mode == "COMPLIANCE" else "COMPLIANCE"
    longer = lock.until + timedelta(days=1)
    _raises(CloudLockError, lambda: bucket.extend_lock("data/p", v, ObjectLock(other, longer)))  # SeaweedFS: both ways
    bucket.extend_lock("data/p", v, lock)  # as long: allowed
    bucket.extend_lock("data/p", v, ObjectLock(mode, lock.until + timedelta(milliseconds=100)))  # the same second
    bucket.extend_lock("data/p", v, ObjectLock(mode, longer))
    assert bucket.lock_of("data/p", v) == _second(ObjectLock(mode, longer))
    assert bucket.get("data/p", v) == b"pack"

    w = bucket.put("data/p", b"written over")  # a lock is its version's own
    assert bucket.lock_of("data/p", None) is None
    bucket.delete("data/p", w)
    assert bucket.versions("data/p") == [v]
    assert _counts(bucket) == {
        "put_object": 2, "get_object": 1, "delete_object": 2, "get_object_retention": 4,
        "put_object_retention": 5, "list_object_versions": 1,
    }  # fmt: skip


def test_extend_lock_locks_an_unlocked_version_and_even_a_delete_marker(backend: Backend) -> None:
    bucket = backend.bucket()
    v = bucket.put("config", b"c")
    assert bucket.lock_of("config", v) is None
    lock = _lock(backend, days=1)
    bucket.extend_lock("config", v, lock)
    assert bucket.lock_of("config", v) == _second(lock)
    _raises(CloudLockError, lambda: bucket.delete("config", v))
    bucket.delete("config", None)
    marker = bucket.versions("config")[1]
    assert bucket.lock_of("config", marker) is None
    bucket.extend_lock("config", marker, lock)  # SeaweedFS keeps a retention on a delete marker ...
    assert bucket.lock_of("config", marker) == _second(lock)
    assert bucket.lock_of("config", None) == _second(lock)  # ... the key's newest entry
    _raises(CloudLockError, lambda: bucket.delete("config", marker))  # ... and holds it


def test_a_lock_that_ended_lets_its_version_go(backend: Backend) -> None:
    bucket = backend.bucket()
    lock = ObjectLock("COMPLIANCE", backend.now() + timedelta(seconds=3))
    v = bucket.put("data/short", b"s", lock)
    _raises(CloudLockError, lambda: bucket.delete("data/short", v))
    backend.wait((lock.until - backend.now()).total_seconds() + 1.5)
    assert bucket.lock_of("data/short", v) == _second(lock)  # reported as it was set
    past = ObjectLock("COMPLIANCE", backend.now() - timedelta(minutes=1))
    _raises(CloudError, lambda: bucket.extend_lock("data/short", v, past))  # InvalidRequest, no lock refused
    later = backend.now() + timedelta(days=1)
    _raises(
        CloudLockError, lambda: bucket.extend_lock("data/short", v, ObjectLock("GOVERNANCE", later))
    )  # the mode stays
    bucket.delete("data/short", v)
    assert bucket.versions("data/short") == []


def test_a_lock_over_already_or_of_no_mode_is_refused_at_put(backend: Backend) -> None:
    bucket = backend.bucket()
    _raises(CloudLockError, lambda: bucket.put("a", b"a", ObjectLock("COMPLIANCE", backend.now() - timedelta(days=1))))
    _raises(CloudLockError, lambda: bucket.put("b", b"b", ObjectLock("FOREVER", backend.now() + timedelta(days=1))))
    assert bucket.listing("") == []


def test_a_bucket_without_object_lock_has_no_versions_and_refuses_locks(backend: Backend) -> None:
    """What `cloud add` must refuse: put returns no version, a locked put is refused."""
    bucket = backend.bucket(lock=False)
    assert bucket.put("k", b"one") is None
    assert bucket.put("k", b"two") is None
    assert bucket.versions("k") == ["null"]
    assert [(o.key, o.version, o.size, o.hidden) for o in bucket.listing("")] == [("k", None, 3, False)]
    assert bucket.get("k", "null") == b"two"
    _raises(CloudLockError, lambda: bucket.put("l", b"l", _lock(backend, days=1)))
    _raises(CloudError, lambda: bucket.lock_of("k", None))  # InvalidRequest: a CloudError, not "no lock"
    _raises(CloudError, lambda: bucket.extend_lock("k", None, _lock(backend, days=1)))
    bucket.delete("k", None)  # no marker: gone
    _raises(CloudObjectError, lambda: bucket.get("k"))
    assert bucket.versions("k") == [] and bucket.listing("") == []


# -- uploads, requests, credentials ---------------------------------------------------------------------


def test_abort_uploads_aborts_what_a_cut_upload_left(backend: Backend) -> None:
    bucket = backend.bucket()
    backend.leave_upload(bucket, "data/a")
    backend.leave_upload(bucket, "data/b")
    assert bucket.abort_uploads() == 2
    assert bucket.abort_uploads() == 0
    assert bucket.listing("") == []  # an upload never completed is no object
    assert _counts(bucket) == {"list_multipart_uploads": 2, "abort_multipart_upload": 2, "list_object_versions": 1}


def test_requests_are_counted_per_request_and_listing_page(backend: Backend) -> None:
    bucket = backend.bucket()
    for i in range(PAGE - 1):
        bucket.put(f"many/{i:05d}", b"")
    bucket.delete("many/00000", None)
    bucket.delete("many/00001", None)  # 1001 entries: versions and markers fill pages alike
    assert len(bucket.listing("many/")) == PAGE - 1
    assert bucket.versions("many/00000")[0] is not None
    assert bucket.listing("elsewhere/") == []  # one page, empty
    _raises(CloudObjectError, lambda: bucket.get("many/00000"))  # a request that failed is counted too
    assert _counts(bucket) == {"put_object": PAGE - 1, "delete_object": 2, "list_object_versions": 2 + 1 + 1,
                               "get_object": 1}  # fmt: skip


def test_wrong_credentials_are_a_cloud_access_error(backend: Backend) -> None:
    bucket = backend.wrong_credentials()
    lock = _lock(backend, days=1)
    for call in (
        lambda: bucket.put("k", b"k"),
        lambda: bucket.put("k", b"k", lock),
        lambda: bucket.get("k"),
        lambda: bucket.get("k", "v", 0, 4),
        lambda: bucket.get_tail("k", None, 4),
        lambda: bucket.listing(""),
        lambda: bucket.versions("k"),
        lambda: bucket.delete("k", None),
        lambda: bucket.delete("k", "v"),  # not CloudLockError: it is no lock that refused it
        lambda: bucket.lock_of("k", None),
        lambda: bucket.extend_lock("k", None, lock),
        lambda: bucket.abort_uploads(),
    ):
        _raises(CloudAccessError, call)
    # A listing's page is counted once it came back: none did.
    assert _counts(bucket) == {"put_object": 2, "get_object": 3, "delete_object": 2, "get_object_retention": 1,
                               "put_object_retention": 1}  # fmt: skip
