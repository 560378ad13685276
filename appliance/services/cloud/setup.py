# SPDX-License-Identifier: GPL-2.0-or-later
"""`cloud add`, `cloud attach` and the store's key: what makes a bucket a cloud store, and finds it again.

`cloud add` proves the bucket (credentials, emptiness, Object Lock by a canary it fails to delete) and makes
the store's key; an appliance that trusted a bucket which lets a locked object go would keep nothing
immutable. `cloud key export` gives the key as a file and as 24 words to write on paper; `cloud attach`
takes either (with the bucket's credentials) on a new machine after a disaster, and reads what the bucket
holds into the index.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from mnemonic import Mnemonic

from appliance.domain.models import validate_new_host_name
from appliance.domain.retention import RetentionPolicy
from appliance.errors import CloudKeyError, CloudLockError, ConfigError
from appliance.log import get_logger
from appliance.ports import BucketAccess, ObjectLock, ObjectStorage, Tools
from appliance.services.cloud.bucket import (
    CONFIG,
    Say,
    checked_config,
    key_file_of,
    new_lock,
    read_config,
    refresh_packs,
    refresh_points,
    utc_now,
)
from appliance.store import cloud as records
from appliance.store.cloud import CloudStore, Index
from appliance.store.layout import Home
from appliance.transfer.sealed import KeyFile, Sealer, SealError, new_key

log = get_logger(__name__)

LOCK_MODES = ("COMPLIANCE", "GOVERNANCE")


def read_credentials(path: Path) -> tuple[str, str]:
    """An AWS shared-credentials file ([default] aws_access_key_id, aws_secret_access_key), or one line
    ACCESS_KEY:SECRET. Refused when others may read it: the secret would not be the appliance's alone."""
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} may be read by others than its owner: chmod 600 it first")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the credentials file {path} ({exc.strerror})") from exc
    parser = configparser.ConfigParser()
    try:
        parser.read_string(text)
    except configparser.Error:
        parser = configparser.ConfigParser()
    for section in ("default", *parser.sections()):
        if parser.has_option(section, "aws_access_key_id") and parser.has_option(section, "aws_secret_access_key"):
            return parser.get(section, "aws_access_key_id").strip(), parser.get(
                section, "aws_secret_access_key"
            ).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    if len(lines) == 1 and lines[0].count(":") == 1 and all(lines[0].split(":")):
        key_id, secret = lines[0].split(":")
        return key_id, secret
    raise ConfigError(f"{path} holds no credentials: an AWS credentials file ([default] aws_access_key_id, "
                      "aws_secret_access_key) or one line ACCESS_KEY:SECRET")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Added:
    store: CloudStore
    lock_proved: str  # what the canary showed ("" when no lock was asked)


def add(home: Home, tools: Tools, *, name: str, endpoint: str, bucket: str, region: str, credentials: Path,
        lock_days: int, lock_mode: str, bandwidth: int, window: str, keep: dict[str, int] | None) -> Added:  # fmt: skip
    """Check the bucket and make a new store in it (refused if it holds anything that is not ours)."""
    validate_new_host_name(name)
    if records.exists(home, name):
        raise ConfigError(
            f"a cloud store named {name} exists", hint="`appliance cloud remove` it first, or pick a name"
        )
    if lock_mode not in LOCK_MODES:
        raise ConfigError(f"invalid lock mode {lock_mode!r}: compliance or governance")
    if lock_days < 0:
        raise ConfigError(f"invalid --lock-days {lock_days}: 0 (no lock) or more")
    if keep is not None:
        RetentionPolicy(**keep)
    key_id, secret = read_credentials(credentials)
    access = BucketAccess(endpoint, bucket, region, key_id, secret)
    storage = tools.bucket(access)
    _refuse_unless_empty(storage, bucket)
    proved = _prove_lock(storage, bucket, lock_days, lock_mode) if lock_days else ""
    store = CloudStore(name=name, store_id=uuid.uuid4().hex, endpoint=endpoint, bucket=bucket, region=region,
                       lock_days=lock_days, lock_mode=lock_mode, bandwidth=bandwidth, window=window,
                       keep=keep)  # fmt: skip
    key = KeyFile(store.store_id, new_key(), name, endpoint, bucket, region)
    sealer = Sealer(key.key, store.store_id)
    config = {"format": "appliance-cloud", "version": 1, "store": store.store_id, "created": utc_now().isoformat(),
              "lock_days": lock_days, "lock_mode": lock_mode, "key_check": sealer.key_check()}  # fmt: skip
    storage.put(CONFIG, json.dumps(config, indent=1).encode(), new_lock(store, utc_now()))
    records.write_credentials(home, name, key_id, secret)
    records.write_secret(home, name, "key", key.dumps())
    records.save(home, store)
    log.info("cloud.added", store=name, endpoint=endpoint, bucket=bucket, lock_days=lock_days, lock_mode=lock_mode)
    return Added(store, proved)


def _refuse_unless_empty(storage: ObjectStorage, bucket: str) -> None:
    found = storage.listing("")
    if not found:
        return
    if any(o.key == CONFIG for o in found):
        raise ConfigError(f"bucket {bucket} already holds an appliance's cloud store",
                          hint="`appliance cloud attach` it with the key file `cloud key export` wrote")  # fmt: skip
    raise ConfigError(f"bucket {bucket} is not empty ({len(found)} objects, e.g. {found[0].key!r}) and holds no "
                      "appliance cloud store", hint="give the appliance a bucket of its own")  # fmt: skip


def _prove_lock(storage: ObjectStorage, bucket: str, days: int, mode: str) -> str:
    """Write a locked canary and try to delete its version: a bucket that lets the delete through does not
    enforce Object Lock, and an appliance that trusted it would keep nothing immutable."""
    key = f"canary/{secrets.token_hex(8)}"
    until = utc_now() + timedelta(days=1)
    try:
        version = storage.put(key, b"appliance object lock canary\n", ObjectLock(mode, until))
    except CloudLockError as exc:
        raise CloudLockError(f"bucket {bucket} has no Object Lock: it refused a locked object ({exc})") from exc
    if version is None:
        raise CloudLockError(f"bucket {bucket} has no versioning, so no Object Lock: a locked object has no version")
    try:
        storage.delete(key, version)
    except CloudLockError:
        log.info("cloud.canary_held", bucket=bucket, mode=mode)
        return f"a {mode.lower()}-locked canary ({key}) could not be deleted: the bucket enforces Object Lock"
    raise CloudLockError(f"bucket {bucket} does not enforce Object Lock: the appliance deleted a locked object "
                         f"({key}, {mode.lower()} mode, locked for {days} days)")  # fmt: skip


def key_export(home: Home, name: str) -> tuple[str, str]:
    """(the key file's text, the key as 24 words to write on paper)."""
    records.load(home, name)
    key = key_file_of(home, name)
    return key.dumps(), key_words(key.key)


def key_words(key: bytes) -> str:
    return str(Mnemonic("english").to_mnemonic(key))


def key_from_words(words: str) -> bytes:
    m, words = Mnemonic("english"), " ".join(words.split())
    if not m.check(words):
        raise CloudKeyError("those words are not a cloud store key (a word is wrong or missing)")
    return bytes(m.to_entropy(words))


def key_text_from_words(
    words: str,
    *,
    name: str | None,
    endpoint: str | None,
    bucket: str | None,
    credentials: Path,
    tools: Tools,
    region: str = "us-east-1",
) -> str:
    """A key file from the 24 words on paper: the store's id is read from the bucket's config object."""
    if not endpoint or not bucket:
        raise ConfigError("attaching with --key-words needs --endpoint and --bucket (the words hold only the key)")
    key = key_from_words(words)
    key_id, secret = read_credentials(credentials)
    storage = tools.bucket(BucketAccess(endpoint, bucket, region, key_id, secret))
    store_id = str(read_config(storage, bucket).get("store", ""))
    return KeyFile(store_id, key, name or "cloud", endpoint, bucket, region).dumps()


def attach(home: Home, tools: Tools, *, key_text: str, credentials: Path, name: str | None = None,
           endpoint: str | None = None, bucket: str | None = None, region: str | None = None,
           say: Say = lambda _: None) -> tuple[CloudStore, int]:  # fmt: skip
    """Attach a store another appliance made (the office burned): its key file and credentials suffice."""
    try:
        key = KeyFile.loads(key_text)
    except SealError as exc:
        raise CloudKeyError(str(exc)) from exc
    name = name or key.name
    validate_new_host_name(name)
    if records.exists(home, name):
        raise ConfigError(f"a cloud store named {name} exists here", hint="pass --name for another name")
    key = dataclasses.replace(key, name=name, endpoint=endpoint or key.endpoint, bucket=bucket or key.bucket,
                              region=region or key.region)  # fmt: skip
    key_id, secret = read_credentials(credentials)
    storage = tools.bucket(BucketAccess(key.endpoint, key.bucket, key.region, key_id, secret))
    config = checked_config(storage, key)
    store = CloudStore(name=name, store_id=key.store_id, endpoint=key.endpoint, bucket=key.bucket, region=key.region,
                       lock_days=int(config.get("lock_days", 0)),
                       lock_mode=str(config.get("lock_mode", "COMPLIANCE")))  # fmt: skip
    records.write_credentials(home, name, key_id, secret)
    records.write_secret(home, name, "key", key.dumps())
    records.save(home, store)
    with Index(home, name) as index:
        count = refresh_points(index, storage, Sealer(key.key, key.store_id))
        refresh_packs(index, storage)
    log.info("cloud.attached", store=name, bucket=key.bucket, points=count)
    return store, count
