# SPDX-License-Identifier: GPL-2.0-or-later
"""The cloud copy against a real S3 server that enforces Object Lock (SeaweedFS, appliance/lab/objectstore.py):
push, restore, attach from a fresh home with the key file, refusals, tampering, and a push killed mid-way."""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.lab import Lab, LabHost
from appliance.lab.objectstore import ObjectStore
from tests.conftest import points_json, run_cli
from tests.integration.test_failback import _boots_with

pytestmark = pytest.mark.integration


def _bucket(store: ObjectStore, *, lock: bool) -> str:
    name = f"b{secrets.token_hex(5)}"
    store.create_bucket(name, lock=lock)
    return name


def _add(home: Path, store: ObjectStore, bucket: str, creds: Path, *extra: str, name: str = "b2") -> None:
    r = run_cli(home, "cloud", "add", name, "--endpoint", store.endpoint, "--bucket", bucket, "--credentials-file",
                str(creds), *extra)  # fmt: skip
    assert r.rc == 0, r.err


def _push(home: Path, *args: str) -> str:
    r = run_cli(home, "cloud", "push", "b2", *args)
    assert r.rc == 0, r.err
    return r.out


def _backup(home: Path, host: LabHost) -> None:
    r = run_cli(home, "backup", host.name)
    assert r.rc == 0, r.err


def test_push_restore_and_attach_from_a_fresh_home(make_host, home: Path, tmp_path: Path,
                                                    object_store: ObjectStore, lab: Lab) -> None:  # fmt: skip
    host = make_host(size=64 << 20, data=0.4)
    creds = object_store.appliance.write(tmp_path / "app.creds")
    _add(home, object_store, _bucket(object_store, lock=True), creds, "--lock-days", "1")
    _backup(home, host)
    first = _push(home)
    assert "pushed point" in first, first
    changed = lab.change(host.name, 0.01, seed=7)
    _backup(home, host)
    second = _push(home, host.name)
    sent = float(second.split(" MiB sent")[0].rsplit(" ", 1)[1]) * (1 << 20)
    assert sent <= 1.2 * changed + 64 * 1024, second  # the changed blocks (sealed, some compress) and a manifest
    assert "already in the bucket" in _push(home)

    restored = tmp_path / "restored.raw"
    r = run_cli(home, "cloud", "restore", "b2", host.name, "--to", str(restored))
    assert r.rc == 0, r.err
    assert restored.read_bytes() == Path(host.disk).read_bytes()

    key = run_cli(home, "cloud", "key", "export", "b2")
    assert key.rc == 0 and len(key.err.split(":\n")[1].split()) == 24, key.err  # the words, on stderr only
    key_file = tmp_path / "b2.key"
    key_file.write_text(key.out)
    fresh = tmp_path / "fresh-home"
    fresh.mkdir()
    r = run_cli(fresh, "cloud", "attach", "--key-file", str(key_file), "--credentials-file", str(creds))
    assert r.rc == 0 and "2 point(s)" in r.out, r.err
    listed = json.loads(run_cli(fresh, "cloud", "points", "b2", host.name, "--json").out)
    assert len(listed) == 2 and all(p["lock"]["mode"] == "COMPLIANCE" for p in listed)
    r = run_cli(fresh, "cloud", "verify", "b2", "--deep")
    assert r.rc == 0, r.err
    again = tmp_path / "again.raw"
    r = run_cli(fresh, "cloud", "restore", "b2", host.name, "--to", str(again), "--point", listed[0]["point"])
    assert r.rc == 0, r.err
    # Into the new appliance's own chain: the host's points are local again, and verify there.
    r = run_cli(fresh, "cloud", "restore", "b2", host.name, "--to-store")
    assert r.rc == 0, r.err
    local = points_json(fresh, host.name)
    assert [(p["id"], p["disks"][0]["digest"]) for p in local] == [
        (listed[1]["point"], listed[1]["disks"][0]["digest"])
    ]
    assert run_cli(fresh, "verify", host.name).rc == 0

    # The appliance's own credentials cannot delete a locked object: the server refuses.
    client = object_store.client(object_store.appliance)
    bucket = json.loads(key.out)["bucket"]
    pack = next(v for v in client.list_object_versions(Bucket=bucket, Prefix="data/")["Versions"])
    with pytest.raises(Exception) as refused:
        client.delete_object(Bucket=bucket, Key=pack["Key"], VersionId=pack["VersionId"])
    assert "AccessDenied" in str(refused.value)
    # A delete without a version only hides it behind a marker: the appliance still reads the locked version.
    client.delete_object(Bucket=bucket, Key=pack["Key"])
    r = run_cli(fresh, "cloud", "verify", "b2", "--deep")
    assert r.rc == 1 and "delete marker" in r.err, r.err


def test_bad_input_is_one_line(home: Path, tmp_path: Path, object_store: ObjectStore) -> None:
    creds = object_store.appliance.write(tmp_path / "app.creds")
    plain = _bucket(object_store, lock=False)

    def add(bucket: str, credentials: Path, *extra: str, endpoint: str | None = None) -> tuple[int, str]:
        r = run_cli(home, "cloud", "add", "b2", "--endpoint", endpoint or object_store.endpoint, "--bucket", bucket,
                    "--credentials-file", str(credentials), *extra)  # fmt: skip
        assert "Traceback" not in r.err
        said = [x for x in r.err.splitlines() if x.strip() and not x.startswith("20")]  # not the log's events
        return r.rc, said[0] if said else ""

    rc, err = add(plain, creds, "--lock-days", "7")
    assert rc == 62 and "has no Object Lock" in err, err
    wrong = tmp_path / "wrong.creds"
    wrong.write_text(f"{object_store.appliance.access_key}:not-the-secret\n")
    wrong.chmod(0o600)
    rc, err = add(plain, wrong)
    assert rc == 61 and "refused" in err, err
    rc, err = add(plain, creds, endpoint="http://127.0.0.1:9")
    assert rc == 61 and "cannot reach" in err, err
    open_creds = tmp_path / "open.creds"
    open_creds.write_text(f"{object_store.appliance.access_key}:{object_store.appliance.secret_key}\n")
    open_creds.chmod(0o644)
    rc, err = add(plain, open_creds)
    assert rc == 3 and "chmod 600" in err, err
    foreign = _bucket(object_store, lock=False)
    object_store.client(object_store.admin).put_object(Bucket=foreign, Key="someone-else.txt", Body=b"x")
    rc, err = add(foreign, creds)
    assert rc == 3 and "not empty" in err, err
    rc, err = add(plain, creds)
    assert rc == 0
    another = tmp_path / "another-store.key"  # a key file of another store, for this bucket
    from appliance.transfer.sealed import KeyFile, new_key

    another.write_text(KeyFile("0" * 32, new_key(), "b2", object_store.endpoint, plain, "us-east-1").dumps())
    r = run_cli(tmp_path / "elsewhere", "cloud", "attach", "--key-file", str(another), "--credentials-file", str(creds))
    assert r.rc == 64 and "another store" in r.err and "Traceback" not in r.err, r.err
    other = tmp_path / "other.key"
    other.write_text("not a key file\n")
    r = run_cli(tmp_path, "cloud", "attach", "--key-file", str(other), "--credentials-file", str(creds))
    assert r.rc == 64 and "Traceback" not in r.err, r.err
    assert run_cli(home, "cloud", "add", "b2", "--endpoint", object_store.endpoint, "--bucket", plain,
                   "--credentials-file", str(creds)).rc == 3  # fmt: skip
    # The secrets are root's alone.
    for secret in ("credentials", "key"):
        assert (home / "cloud" / "b2" / secret).stat().st_mode & 0o077 == 0


def test_a_damaged_object_is_named_and_refused(make_host, home: Path, tmp_path: Path,
                                                object_store: ObjectStore) -> None:  # fmt: skip
    host = make_host(size=16 << 20, data=0.4)
    creds = object_store.appliance.write(tmp_path / "app.creds")
    bucket = _bucket(object_store, lock=False)
    _add(home, object_store, bucket, creds)
    _backup(home, host)
    _push(home)
    admin = object_store.client(object_store.admin)
    pack = admin.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"][0]["Key"]
    body = bytearray(admin.get_object(Bucket=bucket, Key=pack)["Body"].read())
    body[100] ^= 0xFF  # one bit of one sealed block
    admin.put_object(Bucket=bucket, Key=pack, Body=bytes(body))
    r = run_cli(home, "cloud", "verify", "b2", "--deep")
    assert r.rc == 60 and pack in r.err and "damaged" in r.err, r.err
    r = run_cli(home, "cloud", "restore", "b2", host.name, "--to", str(tmp_path / "x.raw"))
    assert r.rc == 63 and pack in r.err and "Traceback" not in r.err, r.err
    admin.delete_object(Bucket=bucket, Key=pack)
    r = run_cli(home, "cloud", "verify", "b2")
    assert r.rc == 60 and f"object {pack} is missing" in r.err, r.err


def test_a_push_killed_at_random_moments_goes_on(make_host, home: Path, tmp_path: Path,
                                                  object_store: ObjectStore) -> None:  # fmt: skip
    host = make_host(size=96 << 20, data=0.5)  # ~48 MiB of data: three packs
    creds = object_store.appliance.write(tmp_path / "app.creds")
    _add(home, object_store, _bucket(object_store, lock=True), creds, "--lock-days", "1")
    _backup(home, host)
    rng = random.Random(int(os.environ.get("TEST_SEED", "12")))
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "--log-json", "cloud", "push",
                                 "b2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
        assert proc.stderr is not None
        wait_for = rng.randint(0, 1)  # packs put before the kill
        for line in proc.stderr:
            if '"cloud.pack_put"' in line:
                wait_for -= 1
                if wait_for < 0:
                    break
        time.sleep(rng.uniform(0.0, 0.2))
        proc.kill()
        finished = proc.wait() == 0
        kills += not finished
        if finished:
            break
    r = run_cli(home, "--log-json", "cloud", "push", "b2")
    assert r.rc == 0, r.err
    listed = json.loads(run_cli(home, "cloud", "points", "b2", "--json").out)
    assert len(listed) == 1, listed
    # Each kill left at most the pack it was putting: everything else the killed pushes put was used.
    s3 = object_store.client(object_store.admin)
    bucket = json.loads(run_cli(home, "cloud", "key", "export", "b2").out)["bucket"]
    packs = s3.list_objects_v2(Bucket=bucket, Prefix="data/").get("Contents", [])
    needed = len({ref[0] for ref in _manifest_packs(home)})
    assert len(packs) <= needed + kills, (len(packs), needed, kills)
    r = run_cli(home, "cloud", "verify", "b2", "--deep")
    assert r.rc == 0, r.err
    restored = tmp_path / "restored.raw"
    assert run_cli(home, "cloud", "restore", "b2", host.name, "--to", str(restored)).rc == 0
    assert restored.read_bytes() == Path(host.disk).read_bytes()


def _manifest_packs(home: Path) -> list[list[object]]:
    """The packs the store's points name (from the appliance's own index of the bucket)."""
    import sqlite3

    from appliance.store.layout import Home
    from appliance.transfer.sealed import KeyFile, Sealer, open_manifest

    key = KeyFile.loads((home / "cloud" / "b2" / "key").read_text())
    sealer = Sealer(key.key, key.store_id)
    db = sqlite3.connect(Home(home).cloud_dir("b2") / "index.sqlite")
    out: list[list[object]] = []
    for (sealed,) in db.execute("SELECT sealed FROM points"):
        out += [[p.name, p.version] for p in open_manifest(sealer, bytes(sealed)).packs]
    return out


@pytest.mark.slow
def test_failover_from_the_bucket_on_a_new_appliance(make_host, guest_image: Path, home: Path, tmp_path: Path,
                                                      object_store: ObjectStore, lab: Lab) -> None:  # fmt: skip
    """Push the lab guest, throw the appliance away, attach from a fresh home with the key file, and boot the
    point from the bucket: the guest prints the point's marker while its blocks stream in."""
    host = make_host(image=guest_image)
    assert run_cli(home, "host", "set", host.name, "--boot-check", "console:APPLIANCE-GUEST-UP marker=\\S+",
                   "--vm-memory", "256").rc == 0  # fmt: skip
    from appliance.lab import guest

    guest.set_marker(host.disk, "from-the-bucket")
    creds = object_store.appliance.write(tmp_path / "app.creds")
    _add(home, object_store, _bucket(object_store, lock=True), creds, "--lock-days", "1")
    _backup(home, host)
    _push(home)
    key_file = tmp_path / "b2.key"
    key_file.write_text(run_cli(home, "cloud", "key", "export", "b2").out)
    import shutil

    shutil.rmtree(home / "store")  # the local store is gone
    fresh = tmp_path / "new-appliance"
    fresh.mkdir()
    assert run_cli(fresh, "cloud", "attach", "--key-file", str(key_file), "--credentials-file", str(creds)).rc == 0
    r = run_cli(fresh, "failover", host.name, "--from", "b2", "--accel", "tcg", "--timeout", "180")
    try:
        assert r.rc == 0 and "marker=from-the-bucket" in r.out, r.out + r.err
        assert "RTO:" in r.out
        # Stopped with its writes kept (or the appliance rebooted): it starts again on its overlay, its NBD
        # server started again on the cache it had.
        assert run_cli(fresh, "failover", "stop", host.name, "--keep").rc == 0
        assert not list((fresh / "failover" / host.name).glob("*.nbd.pid"))
        r = run_cli(fresh, "failover", host.name, "--accel", "tcg", "--timeout", "180")
        assert r.rc == 0 and "resuming" in r.err and "marker=from-the-bucket" in r.out, r.out + r.err
        # Onto repaired hardware over SSH, as any failback: the VM's disk (its reads still served from the
        # bucket's cache) goes to a blank disk, which then boots as the point.
        repaired = make_host(size=1 << 30, data=0.0, add=False)
        r = run_cli(fresh, "failback", host.name, "--to", f"root@{repaired.address}", "--disk",
                    f"{host.disk}={repaired.disk}", "--trust-first-use", "--key", str(lab.key_file))  # fmt: skip
        assert r.rc == 0, r.out + r.err
    finally:
        run_cli(fresh, "failover", "stop", host.name)
    assert not list((fresh / "failover" / host.name).glob("disk0.*")), "the overlay, cache and NBD files are gone"
    assert not list(Path("/run/appliance-nbd").glob("*")) or not any((fresh / "failover" / host.name).glob("*.nbd.pid"))
    _boots_with(repaired.disk, "from-the-bucket", churned=False)  # its VM wrote nothing of its own


def test_the_buckets_retention_drops_old_points_and_what_only_they_needed(
    make_host, home: Path, tmp_path: Path, object_store: ObjectStore, lab: Lab
) -> None:  # type: ignore[no-untyped-def]
    host = make_host(size=32 << 20, data=0.4)
    creds = object_store.appliance.write(tmp_path / "app.creds")
    bucket = _bucket(object_store, lock=False)
    _add(home, object_store, bucket, creds, "--keep-last", "1")
    s3 = object_store.client(object_store.admin)
    _backup(home, host)
    _push(home)
    for seed in (1, 2):
        lab.change(host.name, 0.05, seed=seed)
        _backup(home, host)
        out = _push(home)
    listed = json.loads(run_cli(home, "cloud", "points", "b2", "--json").out)
    assert [p["point"] for p in listed] == [points_json(home, host.name)[-1]["id"]], out
    assert "dropped" in out, out
    packs = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="data/").get("Contents", [])}
    assert packs == {ref[0] for ref in _manifest_packs(home)}  # nothing kept that no point needs
    # A pack that a killed push put and never recorded, which no point names, is collected too.
    s3.put_object(Bucket=bucket, Key=f"data/{secrets.token_hex(16)}", Body=os.urandom(1 << 20))
    r = run_cli(home, "cloud", "prune", "b2")
    assert r.rc == 0 and "freed 1.0 MiB" in r.out, r.out + r.err
    packs = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="data/").get("Contents", [])}
    assert packs == {ref[0] for ref in _manifest_packs(home)}
    restored = tmp_path / "restored.raw"
    assert run_cli(home, "cloud", "restore", "b2", host.name, "--to", str(restored)).rc == 0
    assert restored.read_bytes() == Path(host.disk).read_bytes()
    # Locally, the newest point the bucket holds is kept from merging until a newer one is there.
    assert run_cli(home, "host", "set", host.name, "--keep-last", "1").rc == 0
    r = run_cli(home, "consolidate", host.name, "--dry-run")
    assert "held: the newest point in cloud store b2" in r.out, r.out


def test_locks_are_kept_and_extended_on_what_newer_points_still_need(
    make_host, home: Path, tmp_path: Path, object_store: ObjectStore, lab: Lab
) -> None:  # type: ignore[no-untyped-def]
    import sqlite3
    from datetime import UTC, datetime, timedelta

    host = make_host(size=16 << 20, data=0.4)
    creds = object_store.appliance.write(tmp_path / "app.creds")
    bucket = _bucket(object_store, lock=True)
    _add(home, object_store, bucket, creds, "--lock-days", "3", "--keep-last", "1")
    _backup(home, host)
    _push(home)
    base = {ref[0] for ref in _manifest_packs(home)}
    # A year on, as far as the appliance knows: the base's locks end within the day.
    db = sqlite3.connect(home / "cloud" / "b2" / "index.sqlite")
    soon = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    db.execute("UPDATE packs SET lock_until = ?", (soon,))
    db.commit()
    db.close()
    lab.change(host.name, 0.01, seed=9)
    _backup(home, host)
    out = _push(home)
    assert f"{len(base)} lock(s) extended" in out, out
    s3 = object_store.client(object_store.appliance)
    for name in base:  # the base the new point still needs is locked at least 3 days from now
        version = s3.list_object_versions(Bucket=bucket, Prefix=name)["Versions"][0]["VersionId"]
        until = s3.get_object_retention(Bucket=bucket, Key=name, VersionId=version)["Retention"]["RetainUntilDate"]
        assert until >= datetime.now(UTC) + timedelta(days=3)
    # The first point is past the policy but still locked: kept, and said so.
    assert "kept until its lock ends" in out, out
    assert len(json.loads(run_cli(home, "cloud", "points", "b2", "--json").out)) == 2
