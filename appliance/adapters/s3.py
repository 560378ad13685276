# SPDX-License-Identifier: GPL-2.0-or-later
"""ObjectStorage over boto3: one S3 bucket (AWS, Backblaze B2, Wasabi, Ceph RGW, SeaweedFS, MinIO ...).

boto3 does the protocol, signing and retries: its "standard" retry mode backs off exponentially on 429,
503 and SlowDown, on throttling codes and on dropped connections, up to MAX_ATTEMPTS. Checksums are sent
only when an operation requires them: since boto3 1.36 the default (a CRC32 trailer on every upload) is
refused by many S3-compatible servers (boto3#4392). A version is asked for by id wherever the caller
knows it, so a newer version someone wrote over an object (or a delete marker over it) changes nothing
the appliance reads. This module turns S3's error codes into the appliance's errors, naming the object.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from appliance.errors import CloudAccessError, CloudError, CloudFullError, CloudLockError, CloudObjectError
from appliance.log import get_logger
from appliance.ports import BucketAccess, ObjectLock, StoredObject

log = get_logger(__name__)

MAX_ATTEMPTS = 6
_ACCESS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "AccessDenied", "InvalidBucketName",
           "AuthorizationHeaderMalformed", "PermanentRedirect", "InvalidToken", "ExpiredToken"}  # fmt: skip
_FULL = {"QuotaExceeded", "EntityTooLarge", "InsufficientStorage", "StorageFull", "XMinioStorageFull",
         "XAmzContentSHA256Mismatch-Full"}  # fmt: skip
_MISSING = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}


class S3Bucket:
    def __init__(self, access: BucketAccess, *, connect_timeout: float = 10.0, read_timeout: float = 60.0) -> None:
        self.access = access
        self.requests: dict[str, int] = Counter()
        self._lock = threading.Lock()
        config = Config(
            region_name=access.region, connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            s3={"addressing_style": "path"}, max_pool_connections=16,
        )  # fmt: skip
        session = boto3.session.Session()
        self._s3 = session.client("s3", endpoint_url=access.endpoint, aws_access_key_id=access.access_key,
                                  aws_secret_access_key=access.secret_key, config=config)  # fmt: skip

    # -- the port ---------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, lock: ObjectLock | None = None) -> str | None:
        extra: dict[str, Any] = {}
        if lock is not None:
            extra = {"ObjectLockMode": lock.mode, "ObjectLockRetainUntilDate": lock.until}
        answer = self._call("put_object", key, Key=key, Body=data, **extra)
        return _version(answer.get("VersionId"))

    def get(self, key: str, version: str | None = None, start: int = 0, end: int | None = None) -> bytes:
        extra: dict[str, Any] = {} if version is None else {"VersionId": version}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        answer = self._call("get_object", key, Key=key, **extra)
        return self._read_body(answer, key)

    def get_tail(self, key: str, version: str | None, length: int) -> bytes:
        extra: dict[str, Any] = {} if version is None else {"VersionId": version}
        answer = self._call("get_object", key, Key=key, Range=f"bytes=-{length}", **extra)
        return self._read_body(answer, key)

    def listing(self, prefix: str) -> list[StoredObject]:
        newest: dict[str, StoredObject] = {}
        marked: dict[str, datetime] = {}
        for page in self._pages("list_object_versions", prefix):
            for v in page.get("Versions", []):
                seen = newest.get(v["Key"])
                if seen is None or v["LastModified"] > seen.modified:
                    newest[v["Key"]] = StoredObject(v["Key"], _version(v.get("VersionId")), int(v["Size"]),
                                                    v["LastModified"])  # fmt: skip
            for m in page.get("DeleteMarkers", []):
                if m.get("IsLatest"):
                    marked[m["Key"]] = m["LastModified"]
        return [StoredObject(o.key, o.version, o.size, o.modified, hidden=o.key in marked)
                for o in sorted(newest.values(), key=lambda o: o.key)]  # fmt: skip

    def versions(self, key: str) -> list[str]:
        out = []
        for page in self._pages("list_object_versions", key):
            for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                if entry["Key"] == key:
                    out.append(entry.get("VersionId") or "null")
        return out

    def delete(self, key: str, version: str | None) -> None:
        extra: dict[str, Any] = {} if version is None else {"VersionId": version}
        self._call("delete_object", key, Key=key, **extra)

    def lock_of(self, key: str, version: str | None) -> ObjectLock | None:
        extra: dict[str, Any] = {} if version is None else {"VersionId": version}
        try:
            answer = self._call("get_object_retention", key, Key=key, **extra)
        except CloudObjectError:
            raise
        except CloudError as exc:
            if "ObjectLockConfigurationNotFound" in str(exc) or "NoSuchObjectLockConfiguration" in str(exc):
                return None
            raise
        retention = answer.get("Retention") or {}
        if not retention.get("RetainUntilDate"):
            return None
        return ObjectLock(str(retention.get("Mode", "")), retention["RetainUntilDate"])

    def extend_lock(self, key: str, version: str | None, lock: ObjectLock) -> None:
        extra: dict[str, Any] = {} if version is None else {"VersionId": version}
        self._call("put_object_retention", key, Key=key, Retention={"Mode": lock.mode, "RetainUntilDate": lock.until},
                   **extra)  # fmt: skip

    def abort_uploads(self) -> int:
        aborted = 0
        for page in self._pages("list_multipart_uploads", ""):
            for upload in page.get("Uploads", []):
                self._call("abort_multipart_upload", upload["Key"], Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    # -- plumbing ---------------------------------------------------------------------------------------

    def _count(self, op: str) -> None:
        with self._lock:
            self.requests[op] += 1

    def _call(self, op: str, key: str, **kwargs: Any) -> dict[str, Any]:
        self._count(op)
        with self._errors(op, key):
            answer: dict[str, Any] = getattr(self._s3, op)(Bucket=self.access.bucket, **kwargs)
        return answer

    def _pages(self, op: str, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self._s3.get_paginator(op)
        with self._errors(op, prefix):
            for page in paginator.paginate(Bucket=self.access.bucket, Prefix=prefix):
                self._count(op)
                yield page

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """boto3's exceptions as the appliance's errors, naming the object (or the bucket)."""
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            raise self._error(op, key, exc) from exc
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
            raise CloudAccessError(f"cannot reach the S3 endpoint {self.access.endpoint} ({exc})") from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise CloudError(f"S3 {op} of {key or self.access.bucket} failed: {exc}") from exc

    def _read_body(self, answer: dict[str, Any], key: str) -> bytes:
        try:
            return bytes(answer["Body"].read())
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise CloudError(f"S3 read of {key} broke off: {exc}") from exc

    def _error(self, op: str, key: str, exc: botocore.exceptions.ClientError) -> CloudError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        what = f"{key}" if key else f"bucket {self.access.bucket}"
        detail = f"{code or status}: {error.get('Message', '') or exc}"
        log.debug("s3.error", op=op, key=key, code=code, status=status)
        if code in _MISSING or (status == 404 and op in ("get_object", "head_object")):
            if code == "NoSuchBucket":
                return CloudAccessError(f"there is no bucket {self.access.bucket} at {self.access.endpoint}")
            return CloudObjectError(f"object {what} is missing from bucket {self.access.bucket} ({detail})")
        if code in _FULL or status == 507:
            return CloudFullError(f"bucket {self.access.bucket} is full or over its quota ({detail})")
        if code == "AccessDenied" and op in ("delete_object", "put_object_retention"):
            return CloudLockError(f"S3 refused {op} of {what}: {detail}", hint="")
        if code in _ACCESS or status in (401, 403):
            return CloudAccessError(f"S3 refused {op} of {what} at {self.access.endpoint}: {detail}")
        if code == "InvalidRequest" and op == "put_object":  # what a bucket without Object Lock says to a lock
            return CloudLockError(f"bucket {self.access.bucket} refused a locked object ({detail})")
        return CloudError(f"S3 {op} of {what} failed: {detail}")


def _version(value: object) -> str | None:
    return None if value in (None, "", "null") else str(value)
