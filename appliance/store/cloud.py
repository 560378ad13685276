# SPDX-License-Identifier: GPL-2.0-or-later
"""What the appliance keeps of each cloud store (an S3 bucket it pushes points to), under cloud/<name>/:

  store.json        the store: endpoint, bucket, lock, bandwidth and window, the bucket's retention
  credentials       the bucket's access key and secret (0600: root only; never logged)
  key               the store's key file (0600), as `cloud key export` prints it
  index.sqlite      what the bucket holds, as this appliance wrote or read it: packs (version, lock),
                    blocks (id -> pack, entry), points (manifest, host, point, lock). A cache: `cloud attach`
                    rebuilds it from the bucket, and a push refreshes the points from the bucket's listing
  confirmed.json    {host: the newest point the bucket holds}: kept from local pruning until a newer one is there
  lock              held by the one push or prune of the store at a time

SQLite (the standard library's) holds the index: a push looks up only the blocks that changed, and a store of
millions of blocks never has to fit in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.domain.cloud import PackEntry, PackRef
from appliance.domain.models import HOST_NAME
from appliance.errors import ChainLockedError, ConfigError, DamagedFileError, HostNotFoundError
from appliance.log import get_logger
from appliance.store.files import damaged, private_dir, read_json, write_atomic, write_json
from appliance.store.layout import Home

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CloudStore:
    name: str
    store_id: str
    endpoint: str
    bucket: str
    region: str
    lock_days: int = 0  # 0: objects are not locked
    lock_mode: str = "COMPLIANCE"
    bandwidth: int = 0  # bytes a second a push may take; 0: no limit
    window: str = ""  # HH:MM-HH:MM local when the daemon may push ("": any time)
    interval: float = 0.0  # seconds between the daemon's pushes; 0: after each new point
    keep: dict[str, int] | None = None  # the bucket's own retention (keep-last, -daily ...); None: keep all


def folder(home: Home, name: str) -> Path:
    return home.cloud_dir(name)


def exists(home: Home, name: str) -> bool:
    return (home.cloud_dir(name) / "store.json").exists()


def names(home: Home) -> list[str]:
    """The cloud stores added here (folders whose name is a valid name and that hold a record)."""
    found = sorted(p.name for p in home.clouds_dir.iterdir()) if home.clouds_dir.exists() else []
    return [n for n in found if HOST_NAME.match(n) and exists(home, n)]


def load(home: Home, name: str) -> CloudStore:
    path = home.cloud_dir(name) / "store.json"
    if not path.exists():
        raise HostNotFoundError(f"no cloud store named {name!r}", hint="`appliance cloud list` lists them")
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise damaged(path, "it is not a cloud store record")
    try:
        store = CloudStore(**doc)
    except TypeError as exc:
        raise damaged(path, f"it is not a cloud store record ({exc})") from exc
    if store.name != name:
        raise damaged(path, f"it is the record of cloud store {store.name!r}")
    return store


def save(home: Home, store: CloudStore) -> None:
    private_dir(home.clouds_dir)
    private_dir(home.cloud_dir(store.name))
    write_json(home.cloud_dir(store.name) / "store.json", dataclasses.asdict(store))


def remove(home: Home, name: str) -> None:
    base = home.cloud_dir(name)
    for child in ("store.json", "credentials", "key", "index.sqlite", "index.sqlite-journal", "confirmed.json",
                  "lock"):  # fmt: skip
        (base / child).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        base.rmdir()


def write_secret(home: Home, name: str, which: str, text: str) -> None:
    """credentials or key: 0600 from the first byte (written whole, renamed into place)."""
    private_dir(home.clouds_dir)
    private_dir(home.cloud_dir(name))
    write_atomic(home.cloud_dir(name) / which, text.encode(), mode=0o600)


def read_secret(home: Home, name: str, which: str) -> str:
    path = home.cloud_dir(name) / which
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cloud store {name}'s {which} cannot be read ({exc.strerror})") from exc


def write_credentials(home: Home, name: str, access_key: str, secret_key: str) -> None:
    write_secret(home, name, "credentials", json.dumps({"access_key": access_key, "secret_key": secret_key}))


def credentials(home: Home, name: str) -> tuple[str, str]:
    path = home.cloud_dir(name) / "credentials"
    doc = json.loads(read_secret(home, name, "credentials") or "null")
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("access_key"), str)
        or not isinstance(doc.get("secret_key"), str)
    ):
        raise damaged(path, "it holds no access key and secret")
    return doc["access_key"], doc["secret_key"]


# -- what the bucket holds ----------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(home: Home, name: str, what: str, wait: float = 0.0) -> Iterator[None]:
    """The store's one push or prune at a time: a second one waits up to `wait` seconds, then is refused."""
    path = home.cloud_dir(name) / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() >= deadline:
                    raise ChainLockedError(
                        f"cloud store {name} is busy (a push or prune is under way); {what} not started",
                        hint="wait for it to end; the daemon pushes again at its next turn",
                    ) from exc
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class IndexedPoint:
    manifest: str
    version: str | None
    host: str
    point: str
    created: datetime
    lock_until: datetime | None
    sealed: bytes  # the manifest as stored (opened with the store's key when needed)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (name TEXT PRIMARY KEY, version TEXT, size INTEGER NOT NULL,
                                  lock_until TEXT, uploaded TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (id BLOB PRIMARY KEY, pack TEXT NOT NULL, entry INTEGER NOT NULL,
                                   offset INTEGER NOT NULL, length INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS blocks_by_pack ON blocks (pack, entry);
CREATE TABLE IF NOT EXISTS points (manifest TEXT PRIMARY KEY, version TEXT, host TEXT NOT NULL,
                                   point TEXT NOT NULL, created TEXT NOT NULL, lock_until TEXT, sealed BLOB NOT NULL);
"""


class Index:
    """index.sqlite: every change is one transaction, so a push killed at any moment leaves the index as
    it was after the last pack or point the bucket acknowledged."""

    def __init__(self, home: Home, name: str) -> None:
        path = home.cloud_dir(name) / "index.sqlite"
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.executescript(_SCHEMA)
            os.chmod(path, 0o600)
        except sqlite3.DatabaseError as exc:
            raise DamagedFileError(f"{path} is damaged ({exc})", hint="remove it; `cloud attach` rebuilds it") from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # packs and blocks

    def add_pack(self, pack: PackRef, entries: list[PackEntry], lock_until: datetime | None, at: datetime) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO packs VALUES (?, ?, ?, ?, ?)",
                            (pack.name, pack.version, pack.size, _iso(lock_until), at.isoformat()))  # fmt: skip
            self.db.executemany("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?, ?)",
                                [(e.block_id, pack.name, i, e.offset, e.length)
                                 for i, e in enumerate(entries)])  # fmt: skip

    def find(self, block_ids: Iterable[bytes]) -> dict[bytes, tuple[str, int]]:
        """Which of these blocks the bucket holds: id -> (pack, entry)."""
        out: dict[bytes, tuple[str, int]] = {}
        ids = list(block_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.db.execute(f"SELECT id, pack, entry FROM blocks WHERE id IN ({','.join('?' * len(chunk))})",
                                   chunk).fetchall()  # fmt: skip
            out.update({bytes(r[0]): (r[1], r[2]) for r in rows})
        return out

    def pack(self, name: str) -> PackRef | None:
        row = self.db.execute("SELECT name, version, size FROM packs WHERE name = ?", (name,)).fetchone()
        return PackRef(row[0], row[1], row[2]) if row else None

    def pack_ids(self, name: str) -> list[bytes]:
        """The block ids of a pack, by entry."""
        return [bytes(r[0]) for r in self.db.execute("SELECT id FROM blocks WHERE pack = ? ORDER BY entry", (name,))]

    def pack_entries(self, name: str) -> list[PackEntry]:
        rows = self.db.execute("SELECT id, offset, length FROM blocks WHERE pack = ? ORDER BY entry", (name,))
        return [PackEntry(bytes(r[0]), r[1], r[2]) for r in rows]

    def packs(self) -> list[tuple[PackRef, datetime | None, datetime]]:
        rows = self.db.execute("SELECT name, version, size, lock_until, uploaded FROM packs ORDER BY uploaded")
        return [(PackRef(r[0], r[1], r[2]), _time(r[3]), datetime.fromisoformat(r[4])) for r in rows]

    def set_pack_lock(self, name: str, until: datetime) -> None:
        self.db.execute("UPDATE packs SET lock_until = ? WHERE name = ?", (until.isoformat(), name))

    def drop_pack(self, name: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM blocks WHERE pack = ?", (name,))
            self.db.execute("DELETE FROM packs WHERE name = ?", (name,))

    # points

    def add_point(self, p: IndexedPoint) -> None:
        self.db.execute("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (p.manifest, p.version, p.host, p.point, p.created.isoformat(), _iso(p.lock_until),
                         p.sealed))  # fmt: skip

    def points(self, host: str | None = None) -> list[IndexedPoint]:
        query = "SELECT manifest, version, host, point, created, lock_until, sealed FROM points"
        rows = self.db.execute(query + (" WHERE host = ?" if host else "") + " ORDER BY created, point",
                               (host,) if host else ())  # fmt: skip
        return [IndexedPoint(r[0], r[1], r[2], r[3], datetime.fromisoformat(r[4]), _time(r[5]), bytes(r[6]))
                for r in rows]  # fmt: skip

    def set_point_lock(self, manifest: str, until: datetime) -> None:
        self.db.execute("UPDATE points SET lock_until = ? WHERE manifest = ?", (until.isoformat(), manifest))

    def drop_point(self, manifest: str) -> None:
        self.db.execute("DELETE FROM points WHERE manifest = ?", (manifest,))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


# -- the newest point each host has in each store (kept from local pruning) ---------------------------------


def confirm(home: Home, name: str, held: dict[str, str]) -> None:
    write_json(home.cloud_dir(name) / "confirmed.json", {"store": name, "confirmed": held})


def cloud_holds(home: Home, host: str) -> dict[str, str]:
    """{point id: why} of the newest point of `host` each cloud store holds (until a newer one is there)."""
    holds: dict[str, str] = {}
    for name in names(home):
        path = home.cloud_dir(name) / "confirmed.json"
        if not path.exists():
            continue
        try:
            doc = read_json(path)
            held = doc.get("confirmed") if isinstance(doc, dict) else None
            if not isinstance(held, dict):
                raise damaged(path, "it has no confirmed points")
        except DamagedFileError as exc:
            log.warning("store.cloud_confirmed_unreadable", file=str(path), error=exc.message)
            continue
        if isinstance(held.get(host), str):
            holds[held[host]] = f"the newest point in cloud store {name}"
    return holds
