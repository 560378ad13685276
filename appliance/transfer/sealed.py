# SPDX-License-Identifier: GPL-2.0-or-later
"""What the cloud copy seals before anything leaves the appliance (layout: domain/cloud.py).

One random 256-bit key per cloud store (`cloud add` makes it; `cloud key export` is the only way it leaves).
From it, HKDF-SHA256 (salted with the store's id) derives three keys, each for one use:

  blocks    AES-256-GCM over each block (zstd first when that shrinks it), the block's id as associated
            data: a block cannot be served as another one, and any changed byte fails its tag
  ids       HMAC-SHA256 over a block's sha256: its id, stable for a content but meaningless without the key
  meta      AES-256-GCM over pack headers, manifests and the config's key check, each with its kind (and a
            pack header with its object's name) as associated data

Nonces are 96 random bits per seal (os.urandom); at 32 KiB blocks a key meets the 2^32-seal bound of random
GCM nonces after 128 TiB of unique data. The cryptography library does the work; nothing here is a cipher.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.domain.cloud import (
    TRAILER,
    CloudDisk,
    CloudPoint,
    LayoutError,
    PackEntry,
    PackRef,
    decode_entries,
    encode_entries,
)
from appliance.transfer.protocol import zstd

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
FORMAT = "appliance-cloud"
VERSION = 1
_RAW, _ZSTD = b"\x00", b"\x01"
_CHECK = b"appliance cloud store key check"


class SealError(Exception):
    """A sealed object that does not open with this store's key: tampered with, truncated, or another key's."""


def new_key() -> bytes:
    return os.urandom(KEY_LEN)


class Sealer:
    """A store's derived keys, and sealing and opening with them."""

    def __init__(self, master: bytes, store_id: str) -> None:
        if len(master) != KEY_LEN:
            raise ValueError("a cloud store key is 32 bytes")
        self.store_id = store_id
        self._blocks = AESGCM(_derive(master, store_id, b"blocks"))
        self._meta = AESGCM(_derive(master, store_id, b"meta"))
        self._ids = _derive(master, store_id, b"ids")

    def block_id(self, sha256: bytes) -> bytes:
        return hmac.new(self._ids, sha256, hashlib.sha256).digest()

    def seal_block(self, block_id: bytes, plain: bytes) -> bytes:
        squeezed = zstd.compress(plain, 3) if plain else b""
        body = _ZSTD + squeezed if len(squeezed) < len(plain) * 0.9 else _RAW + plain
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._blocks.encrypt(nonce, body, block_id)

    def open_block(self, block_id: bytes, sealed: bytes, length: int) -> bytes:
        """The block's bytes, checked against its id (what a manifest asked for is what comes back)."""
        body = _open(self._blocks, sealed, block_id)
        if body[:1] == _ZSTD:
            try:
                plain = zstd.ZstdDecompressor().decompress(body[1:], max_length=length)
            except zstd.ZstdError as exc:
                raise SealError(f"a block does not decompress ({exc})") from exc
        elif body[:1] == _RAW:
            plain = body[1:]
        else:
            raise SealError("a block of an unknown kind")
        if len(plain) != length or not hmac.compare_digest(self.block_id(hashlib.sha256(plain).digest()), block_id):
            raise SealError("a block whose content is not the one its id names")
        return plain

    def seal_meta(self, kind: bytes, plain: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._meta.encrypt(nonce, zstd.compress(plain, 3), kind)

    def open_meta(self, kind: bytes, sealed: bytes, limit: int = 1 << 30) -> bytes:
        try:
            return zstd.ZstdDecompressor().decompress(_open(self._meta, sealed, kind), max_length=limit)
        except zstd.ZstdError as exc:
            raise SealError(f"sealed metadata that does not decompress ({exc})") from exc

    def key_check(self) -> str:
        return base64.b64encode(self.seal_meta(b"check", _CHECK)).decode()

    def checks(self, sealed_check: str) -> bool:
        try:
            return self.open_meta(b"check", base64.b64decode(sealed_check, validate=True)) == _CHECK
        except (SealError, ValueError):
            return False


def _derive(master: bytes, store_id: str, purpose: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=KEY_LEN, salt=store_id.encode(), info=b"appliance-cloud-v1 " + purpose
    )
    return hkdf.derive(master)


def _open(aead: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < NONCE_LEN + TAG_LEN:
        raise SealError("a sealed object shorter than its nonce and tag")
    try:
        return aead.decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], aad)
    except InvalidTag as exc:
        raise SealError("authentication failed: changed, truncated, or sealed with another key") from exc


# -- packs ------------------------------------------------------------------------------------------------


class PackWriter:
    """Sealed blocks gathered into one object: blocks, then the sealed header, then its length."""

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self.parts: list[bytes] = []
        self.entries: list[PackEntry] = []
        self.size = 0
        self.plain_bytes = 0

    def add(self, block_id: bytes, plain: bytes) -> int:
        """Seal a block into the pack; returns its entry number."""
        sealed = self.sealer.seal_block(block_id, plain)
        self.entries.append(PackEntry(block_id, self.size, len(sealed)))
        self.parts.append(sealed)
        self.size += len(sealed)
        self.plain_bytes += len(plain)
        return len(self.entries) - 1

    def finish(self, name: str) -> bytes:
        header = self.sealer.seal_meta(b"pack-header " + name.encode(), encode_entries(self.entries))
        return b"".join(self.parts) + header + TRAILER.pack(len(header))


def header_span(pack_size: int, tail: bytes) -> int:
    """How many bytes from a pack's end its sealed header and trailer take (read from the last 4 bytes)."""
    if len(tail) < TRAILER.size:
        raise SealError("a pack shorter than its trailer")
    length = int(TRAILER.unpack(tail[-TRAILER.size :])[0])
    if length + TRAILER.size > pack_size:
        raise SealError(f"a pack header of {length} bytes in a pack of {pack_size}")
    return length + TRAILER.size


def open_header(sealer: Sealer, name: str, pack_size: int, tail: bytes) -> list[PackEntry]:
    """A pack's entries, from (at least) the pack's last header_span() bytes."""
    span = header_span(pack_size, tail)
    if len(tail) < span:
        raise SealError("a pack tail shorter than its header")
    sealed = tail[len(tail) - span : len(tail) - TRAILER.size]
    try:
        return decode_entries(sealer.open_meta(b"pack-header " + name.encode(), sealed), pack_size - span)
    except LayoutError as exc:
        raise SealError(str(exc)) from exc


# -- manifests --------------------------------------------------------------------------------------------


def seal_manifest(sealer: Sealer, point: CloudPoint) -> bytes:
    doc = {
        "format": FORMAT, "version": VERSION, "store": sealer.store_id, "host": point.host, "point": point.point,
        "created": point.created.isoformat(), "pushed": point.pushed.isoformat(), "settings": point.settings,
        "consistency": point.consistency,
        "packs": [[p.name, p.version, p.size] for p in point.packs],
        "disks": [{"slot": d.slot, "size": d.size, "block_size": d.block_size, "digest": d.digest,
                   "runs": base64.b64encode(d.runs).decode()} for d in point.disks],
    }  # fmt: skip
    return sealer.seal_meta(b"manifest", json.dumps(doc, separators=(",", ":")).encode())


def open_manifest(sealer: Sealer, sealed: bytes) -> CloudPoint:
    doc = json.loads(sealer.open_meta(b"manifest", sealed))
    try:
        if doc["format"] != FORMAT or doc["version"] != VERSION or doc["store"] != sealer.store_id:
            raise SealError("a manifest of another store or format")
        disks = tuple(CloudDisk(str(d["slot"]), int(d["size"]), int(d["block_size"]), str(d["digest"]),
                                base64.b64decode(d["runs"], validate=True)) for d in doc["disks"])  # fmt: skip
        packs = tuple(PackRef(str(n), None if v is None else str(v), int(s)) for n, v, s in doc["packs"])
        return CloudPoint(str(doc["host"]), str(doc["point"]), _time(doc["created"]), _time(doc["pushed"]),
                          dict(doc["settings"]), str(doc["consistency"]), packs, disks)  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise SealError(f"a manifest that does not describe a point ({exc})") from exc


def _time(text: Any) -> datetime:
    moment = datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        raise ValueError("a time without its zone")
    return moment


# -- the key file -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyFile:
    """What `cloud key export` writes: the key, and where its store is (not the credentials)."""

    store_id: str
    key: bytes
    name: str
    endpoint: str
    bucket: str
    region: str

    def dumps(self) -> str:
        return json.dumps({"format": FORMAT + "-key", "version": VERSION, "store": self.store_id,
                           "key": base64.b64encode(self.key).decode(), "name": self.name,
                           "endpoint": self.endpoint, "bucket": self.bucket, "region": self.region},
                          indent=1) + "\n"  # fmt: skip

    @classmethod
    def loads(cls, text: str) -> KeyFile:
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT + "-key" or doc.get("version") != VERSION:
                raise ValueError("not an appliance cloud key file")
            key = base64.b64decode(doc["key"], validate=True)
            if len(key) != KEY_LEN:
                raise ValueError("its key is not 32 bytes")
            return cls(str(doc["store"]), key, str(doc["name"]), str(doc["endpoint"]), str(doc["bucket"]),
                       str(doc["region"]))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SealError(f"not a cloud store key file ({exc})") from exc
