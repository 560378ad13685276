# SPDX-License-Identifier: GPL-2.0-or-later
"""FakeBucket: the ObjectStorage port in memory, for unit tests of the use cases.

It is what `S3Bucket` (appliance/adapters/s3.py) on a bucket with Object Lock gives the appliance's
least-privileged key, as tests/integration/test_bucket_contract.py finds it against SeaweedFS, where the
same assertions run against both:

- Every put makes a new version (newest wins a plain get); `put` returns its id. A delete without a
  version stacks a delete marker (also on a key never written): a plain get then finds nothing, the
  listing says `hidden`, a get by version still reads. A delete by version removes that version (or that
  marker, which unhides what is under it); a version that is not there is no error.
- A get by version of a delete marker, of another key's version or of none is a CloudObjectError, as is a
  lock_of or extend_lock of one (the server says NoSuchKey or NoSuchVersion).
- Object Lock, COMPLIANCE or GOVERNANCE alike (the appliance has no bypass): a version whose lock has not
  ended cannot be deleted (CloudLockError), its retention cannot be shortened nor its mode changed (even
  after it ended: CloudLockError); it can be kept longer, or as long. A retention is kept to the whole
  second (the sub-second part dropped). A put whose lock is already over, or of an unknown mode, is
  refused (CloudLockError); so is an extend_lock to a date passed (a CloudError). lock_of reports a lock
  that has ended as it was set. extend_lock may lock an unlocked version, and even a delete marker, which
  then cannot be deleted either; lock_of of a marker, or of a key whose newest entry is one, is that
  marker's lock (None unless locked so).
- Ranges as the adapter sends them (`bytes=START-(END-1)`, `bytes=-LENGTH`): an end past the object reads
  to its end; a start at or past its end, an empty range (START == END > 0), a tail of 0 bytes or any range
  of an empty object is InvalidRange (a CloudError); `end=0` makes the header `bytes=START--1`, which the
  server ignores: the whole object comes back.
- `listing(prefix)`: per key starting with `prefix` (a plain string prefix, sorted), its newest version
  that is no marker, `hidden` when a marker is the newest entry; a key with only markers is not listed.
  `versions(key)`: the key's versions newest first, then its markers newest first (S3 lists them apart).
  `modified` is to the whole second.
- `requests` counts as the adapter does: one per put_object, get_object (get and get_tail),
  delete_object, get_object_retention, put_object_retention, abort_multipart_upload, counted even when
  the request fails; list_object_versions and list_multipart_uploads once per page of 1000 entries
  (versions and markers of every key under the prefix), counted only when the page came back.
- `object_lock=False`: a bucket without versioning nor Object Lock: put returns None, its one version is
  "null", a delete removes, a locked put is refused (CloudLockError), lock_of and extend_lock are a CloudError.
- `wrong_credentials=True`: every request is refused with CloudAccessError (SignatureDoesNotMatch).

Beyond the port, for tests: `fail(operation, error, after=n, applied=False)` makes an operation (a port
method's name) raise `error` once, after `n` calls of it succeed (FakeImages' pattern); `applied=True`
lets that call take effect first (the bucket did it, the answer was lost). `start_upload(key)` leaves a
multipart upload behind as a killed push would; `tamper(key, data)` changes an object's bytes in place
(bit rot, or someone with the bucket owner's rights), no request counted and no lock asked; `clock` gives
the bucket's time (locks end by it).
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.errors import ApplianceError, CloudAccessError, CloudError, CloudLockError, CloudObjectError
from appliance.ports import ObjectLock, StoredObject

OPERATIONS = frozenset(
    {"put", "get", "get_tail", "listing", "versions", "delete", "lock_of", "extend_lock", "abort_uploads"}
)
MODES = frozenset({"COMPLIANCE", "GOVERNANCE"})
PAGE = 1000  # entries per page of a listing (S3's MaxKeys)
NULL = "null"  # the one version of an object in a bucket without versioning


@dataclass(slots=True)
class _Version:
    id: str
    data: bytes | None  # None: a delete marker
    modified: datetime
    lock: ObjectLock | None = None

    @property
    def marker(self) -> bool:
        return self.data is None


@dataclass(slots=True)
class _Armed:
    calls_left: int
    error: ApplianceError
    applied: bool


@dataclass(slots=True)
class _Upload:
    key: str
    upload_id: str


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _second(t: datetime) -> datetime:
    return t.replace(microsecond=0)


class FakeBucket:
    """The ObjectStorage port in memory. See the module doc."""

    def __init__(self, name: str = "fake-bucket", *, object_lock: bool = True, wrong_credentials: bool = False,
                 clock: Callable[[], datetime] = _utc_now) -> None:  # fmt: skip
        self.name = name
        self.object_lock = object_lock
        self.wrong_credentials = wrong_credentials
        self.clock = clock
        self.requests: dict[str, int] = Counter()
        self._keys: dict[str, list[_Version]] = {}  # each key's versions and markers, oldest first
        self._uploads: list[_Upload] = []
        self._armed: dict[str, _Armed] = {}
        self._ids = itertools.count(1)
        self._mutex = threading.RLock()

    # -- failures and test helpers ---------------------------------------------------------------------

    def fail(self, operation: str, error: ApplianceError, *, after: int = 0, applied: bool = False) -> None:
        """Make `operation` raise `error` once, after `after` calls of it succeed; `applied`: that call
        takes effect before it raises (the request was carried out, its answer lost)."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {sorted(OPERATIONS)}")
        with self._mutex:
            self._armed[operation] = _Armed(after, error, applied)

    @property
    def armed(self) -> set[str]:
        """Operations whose failure has not fired yet (a test asserts it did)."""
        with self._mutex:
            return set(self._armed)

    def start_upload(self, key: str) -> str:
        """A multipart upload left open (what a push killed mid-upload leaves); returns its id."""
        with self._mutex:
            upload = _Upload(key, f"upload-{next(self._ids)}")
            self._uploads.append(upload)
            return upload.upload_id

    def tamper(self, key: str, data: bytes, version: str | None = None) -> None:
        """Replace the bytes of a version (the newest by default) in place: no request, no lock asked."""
        with self._mutex:
            self._find(key, version).data = bytes(data)

    def keys(self) -> list[str]:
        """Every key with a version that is not a delete marker (no request counted)."""
        with self._mutex:
            return sorted(k for k, entries in self._keys.items() if any(not v.marker for v in entries))

    # -- the port --------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, lock: ObjectLock | None = None) -> str | None:
        with self._request("put", "put_object", key) as armed:
            if lock is not None:
                if not self.object_lock or lock.mode not in MODES or _second(lock.until) <= self.clock():
                    raise CloudLockError(f"bucket {self.name} refused a locked object (InvalidRequest)")
                lock = ObjectLock(lock.mode, _second(lock.until))
            version = self._new_version(bytes(data), lock)
            if self.object_lock:
                self._keys.setdefault(key, []).append(version)
            else:
                self._keys[key] = [version]
            armed()
            return version.id if self.object_lock else None

    def get(self, key: str, version: str | None = None, start: int = 0, end: int | None = None) -> bytes:
        with self._request("get", "get_object", key) as armed:
            data = self._data(key, version)
            armed()
            if not start and end is None:
                return data
            last = None if end is None else end - 1
            if last is not None and last < 0:  # "bytes=START--1": not a range, the server ignores it
                return data
            if start >= len(data) or (last is not None and last < start):
                raise self._invalid_range(key)
            return data[start : None if last is None else last + 1]

    def get_tail(self, key: str, version: str | None, length: int) -> bytes:
        with self._request("get_tail", "get_object", key) as armed:
            data = self._data(key, version)
            armed()
            if length <= 0 or not data:
                raise self._invalid_range(key)
            return data[-length:]

    def listing(self, prefix: str) -> list[StoredObject]:
        with self._pages("listing", "list_object_versions", prefix) as armed:
            out = []
            for key in sorted(k for k in self._keys if k.startswith(prefix)):
                entries = self._keys[key]
                held = [v for v in entries if not v.marker]
                if not held:
                    continue
                newest = held[-1]
                out.append(StoredObject(key, self._said(newest.id), len(newest.data or b""), newest.modified,
                                        hidden=entries[-1].marker))  # fmt: skip
            armed()
            return out

    def versions(self, key: str) -> list[str]:
        with self._pages("versions", "list_object_versions", key) as armed:
            entries = self._keys.get(key, [])
            armed()
            return [v.id for v in reversed(entries) if not v.marker] + [v.id for v in reversed(entries) if v.marker]

    def delete(self, key: str, version: str | None) -> None:
        with self._request("delete", "delete_object", key) as armed:
            entries = self._keys.get(key, [])
            if version is None and self.object_lock:
                self._keys.setdefault(key, []).append(self._new_version(None, None))
            elif version is None or (not self.object_lock and version == NULL):
                self._keys.pop(key, None)
            else:
                found = next((v for v in entries if v.id == version), None)
                if found is not None:
                    if found.lock is not None and found.lock.until > self.clock():
                        raise CloudLockError(f"S3 refused delete_object of {key}: AccessDenied: Access Denied.",
                                             hint="")  # fmt: skip
                    entries.remove(found)
                    if not entries:
                        del self._keys[key]
            armed()

    def lock_of(self, key: str, version: str | None) -> ObjectLock | None:
        with self._request("lock_of", "get_object_retention", key) as armed:
            if not self.object_lock:
                raise CloudError(f"S3 get_object_retention of {key} failed: InvalidRequest: Invalid Request")
            found = self._entry(key, version)
            armed()
            return found.lock

    def extend_lock(self, key: str, version: str | None, lock: ObjectLock) -> None:
        with self._request("extend_lock", "put_object_retention", key) as armed:
            if not self.object_lock:
                raise CloudError(f"S3 put_object_retention of {key} failed: InvalidRequest: Invalid Request")
            found = self._entry(key, version)
            until = _second(lock.until)
            if lock.mode not in MODES or until <= self.clock():
                raise CloudError(f"S3 put_object_retention of {key} failed: InvalidRequest: Invalid Request")
            held = found.lock
            if held is not None and (held.mode != lock.mode or (until < held.until and held.until > self.clock())):
                raise CloudLockError(f"S3 refused put_object_retention of {key}: AccessDenied: Access Denied.",
                                     hint="")  # fmt: skip
            found.lock = ObjectLock(lock.mode, until)
            armed()

    def abort_uploads(self) -> int:
        with self._pages("abort_uploads", "list_multipart_uploads", None) as armed:
            uploads, self._uploads = self._uploads, []
            self.requests["abort_multipart_upload"] += len(uploads)
            armed()
            return len(uploads)

    # -- plumbing --------------------------------------------------------------------------------------

    def _new_version(self, data: bytes | None, lock: ObjectLock | None) -> _Version:
        n = next(self._ids)
        vid = f"{(1 << 64) - n:016x}{n * 0x9E3779B97F4A7C15 % (1 << 64):016x}" if self.object_lock else NULL
        return _Version(vid, data, _second(self.clock()), lock)

    def _said(self, vid: str) -> str | None:
        return None if vid == NULL else vid

    def _missing(self, key: str, what: str) -> CloudObjectError:
        return CloudObjectError(f"object {key} is missing from bucket {self.name} ({what})")

    def _invalid_range(self, key: str) -> CloudError:
        return CloudError(f"S3 get_object of {key} failed: InvalidRange: The requested range is not satisfiable")

    def _entry(self, key: str, version: str | None) -> _Version:
        """The entry a retention request names (a marker too): the newest without a version."""
        entries = self._keys.get(key, [])
        if version is None:
            if not entries:
                raise self._missing(key, "NoSuchKey: The specified key does not exist.")
            return entries[-1]
        found = next((v for v in entries if v.id == version), None)
        if found is None:
            raise self._missing(key, "NoSuchKey: The specified key does not exist.")
        return found

    def _find(self, key: str, version: str | None) -> _Version:
        """The version a get reads: the newest (unless a marker is), or the one named (never a marker)."""
        entries = self._keys.get(key, [])
        if version is None or (not self.object_lock and version == NULL):
            if not entries or entries[-1].marker:
                raise self._missing(key, "NoSuchKey: The specified key does not exist.")
            return entries[-1]
        found = next((v for v in entries if v.id == version), None)
        if found is None:
            if not self.object_lock or not entries:
                raise self._missing(key, "NoSuchKey: The specified key does not exist.")
            raise self._missing(key, "NoSuchVersion: The specified version does not exist.")
        if found.marker:
            raise self._missing(key, "NoSuchKey: The specified key does not exist.")
        return found

    def _data(self, key: str, version: str | None) -> bytes:
        return self._find(key, version).data or b""

    def _refused(self, op: str, key: str | None) -> CloudAccessError:
        what = key if key else f"bucket {self.name}"
        return CloudAccessError(f"S3 refused {op} of {what}: SignatureDoesNotMatch: the request signature we "
                                "calculated does not match the signature you provided")  # fmt: skip

    def _take(self, operation: str) -> _Armed | None:
        """The armed failure of `operation` if its turn has come (and disarmed), else None."""
        armed = self._armed.get(operation)
        if armed is None:
            return None
        if armed.calls_left > 0:
            armed.calls_left -= 1
            return None
        del self._armed[operation]
        return armed

    def _request(self, operation: str, op: str, key: str) -> _Step:
        """One S3 request: counted first (the adapter counts a request that fails too)."""
        return _Step(self, operation, op, key, count=True)

    def _pages(self, operation: str, op: str, prefix: str | None) -> _Step:
        """A paginated listing: its pages are counted once they come back."""
        return _Step(self, operation, op, prefix, count=False)

    def _page_count(self, prefix: str | None) -> int:
        if prefix is None:
            entries = len(self._uploads)
        else:
            entries = sum(len(v) for k, v in self._keys.items() if k.startswith(prefix))
        return max(1, -(-entries // PAGE))


class _Step:
    """The context of one port call: the lock held, the request counted, failures raised at their turn.

    `with ... as armed:` the body calls `armed()` once its effect is done: an armed failure with
    `applied` raises there; one without raised before the body ran."""

    def __init__(self, bucket: FakeBucket, operation: str, op: str, key: str | None, *, count: bool) -> None:
        self.bucket, self.operation, self.op, self.key, self.count = bucket, operation, op, key, count
        self.failure: _Armed | None = None

    def __enter__(self) -> Callable[[], None]:
        b = self.bucket
        b._mutex.acquire()
        try:
            if self.count:
                b.requests[self.op] += 1
            if b.wrong_credentials:
                raise b._refused(self.op, self.key)
            self.failure = b._take(self.operation)
            if self.failure is not None and not self.failure.applied:
                raise self.failure.error
            if not self.count:
                b.requests[self.op] += b._page_count(self.key)
        except BaseException:
            b._mutex.release()
            raise
        return self._done

    def _done(self) -> None:
        if self.failure is not None:
            raise self.failure.error

    def __exit__(self, *exc: object) -> None:
        self.bucket._mutex.release()
