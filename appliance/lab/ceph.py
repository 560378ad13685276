# SPDX-License-Identifier: GPL-2.0-or-later
"""Ceph RGW for the lab: a one-node Ceph cluster and its S3 gateway, without systemd, in a lab host's namespace.

SeaweedFS (appliance/lab/objectstore.py) is quick enough for every test run; RGW is what most private clouds
run, so the appliance's cloud copy is proven against it too, in its own heavier run (tests/heavy/test_cloud_ceph.py).
Debian 12's packages (ceph-mon ceph-mgr ceph-osd radosgw; `./install --ceph`) are started by hand as vstart.sh
does: one monitor, one manager, one OSD (BlueStore on a sparse file), every pool of size 1, and radosgw with
its beast frontend. Every daemon runs in the foreground (`-f`) as a child of this process, in a lab host's
network namespace (its own address: no port clashes, and its link can be shaped or cut like any lab host's),
with all its state, sockets and logs under the caller's folder. `stop` ends every daemon it started.

Two S3 users (`radosgw-admin user create`): `admin` creates the buckets and owns them; `appliance` owns
nothing and is granted, by each bucket's policy, only what an appliance needs to keep locked copies
(APPLIANCE_ACTIONS: never s3:BypassGovernanceRetention), so a test sees what a least-privileged appliance sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.adapters.process import CommandFailed, die_with_parent, run
from appliance.errors import LabError
from appliance.lab import Lab, LabHost
from appliance.lab.objectstore import S3Credentials, s3_client
from appliance.log import get_logger

log = get_logger(__name__)

RGW_PORT = 7480  # radosgw's own default
START_TIMEOUT = 120.0
BINARIES = ("ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "ceph", "radosgw-admin", "ceph-authtool", "monmaptool")
OSD_SIZE = 16 << 30  # the OSD's sparse file: only what is written takes space
# What the appliance user may do in a bucket the admin owns (its policy). ListBucketMultipartUploads and
# AbortMultipartUpload: a push first aborts uploads a killed push left (S3Bucket.abort_uploads).
APPLIANCE_ACTIONS = [
    "s3:ListBucket", "s3:ListBucketVersions", "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject",
    "s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutObjectRetention", "s3:GetObjectRetention",
    "s3:ListBucketMultipartUploads", "s3:AbortMultipartUpload",
]  # fmt: skip
_DAEMONS = ("mon.a", "mgr.x", "osd.0", "client.rgw.gw")  # started in this order, stopped in the reverse one


@dataclass(slots=True)
class CephStore:
    """A running one-node Ceph cluster with radosgw in a lab host's namespace: the interface of ObjectStore."""

    host: LabHost
    admin: S3Credentials  # owns and creates the buckets
    appliance: S3Credentials  # least privilege: a bucket policy per bucket (APPLIANCE_ACTIONS)
    folder: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    port: int = RGW_PORT

    @property
    def endpoint(self) -> str:
        return f"http://{self.host.address}:{self.port}"

    @property
    def config(self) -> Path:
        return self.folder / "ceph.conf"

    def log_file(self, daemon: str) -> Path:
        return self.folder / "log" / f"{daemon}.log"

    def client(self, who: S3Credentials, *, retries: int = 0) -> Any:
        return s3_client(self.endpoint, who, retries=retries)

    def create_bucket(self, name: str, *, lock: bool) -> None:
        """Create bucket `name` as admin (`lock`: with Object Lock, hence versioning) and let the appliance user
        use it through the bucket's policy."""
        if len(name) < 3:
            raise LabError(f"bucket name {name!r} is too short: S3 bucket names have 3 characters or more")
        admin = self.client(self.admin)
        admin.create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": ["arn:aws:iam:::user/appliance"]},
                    "Action": APPLIANCE_ACTIONS,
                    "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"],
                },
                {  # RGW falls back to the object's ACL when no statement allows an action: the user who wrote
                    # an object is its owner, and its owner may bypass a governance lock unless a policy denies it.
                    "Effect": "Deny",
                    "Principal": {"AWS": ["arn:aws:iam:::user/appliance"]},
                    "Action": ["s3:BypassGovernanceRetention"],
                    "Resource": [f"arn:aws:s3:::{name}/*"],
                },
            ],
        }
        admin.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """A `ceph` command as client.admin, in the cluster's namespace."""
        return self._tool("ceph", *args, timeout=timeout)

    def radosgw_admin(self, *args: str, timeout: float = 60.0) -> str:
        return self._tool("radosgw-admin", *args, timeout=timeout)

    def in_namespace(self, argv: list[str | Path], *, timeout: float = 60.0) -> str:
        """Run argv in the cluster's namespace: a daemon's --mkfs picks its address among the namespace's."""
        return run(["ip", "netns", "exec", self.host.netns, *argv], timeout=timeout)

    def _tool(self, tool: str, *args: str, timeout: float) -> str:
        try:
            return self.in_namespace([tool, "-c", self.config, *args], timeout=timeout)
        except CommandFailed as exc:
            raise LabError(f"`{tool} {' '.join(args)}` failed: {exc.last_line}") from exc

    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())

    def stop(self, grace: float = 5.0) -> None:
        """End every daemon it started, one after the other, the gateway first and the monitor last (in 2 s; all
        at once, the OSD and the gateway wait 5 s for the monitor they lost): SIGTERM, SIGKILL after `grace`
        seconds. The cluster's files stay in `folder` (remove_state throws them away)."""
        for daemon in reversed(_DAEMONS):
            process = self.processes.get(daemon)
            if process is None or process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        log.info("lab.ceph_down", host=self.host.name)


def start_ceph(lab: Lab, folder: Path, name: str = "ceph", *, timeout: float = START_TIMEOUT) -> CephStore:
    """Start a one-node Ceph cluster and radosgw in lab host `name` (created if the lab has none), every file
    under `folder` (a cluster started there before is thrown away). Returns once both S3 users exist and the
    admin's requests are answered; the time each step took is logged (`lab.ceph_up`)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise LabError(f"Ceph is not installed ({', '.join(missing)} missing)", hint="./install --ceph")
    host = next(h for h in lab.up([name], disk_size=1 << 20) if h.name == name)
    folder = folder.resolve()
    if len(str(folder / "run" / "client.rgw.gw.asok")) > 100:  # a Unix socket's path has at most 107 bytes
        raise LabError(f"the Ceph lab folder {folder} is too long a path for the daemons' admin sockets")
    remove_state(folder)
    shutil.rmtree(folder / "log", ignore_errors=True)
    for sub in ("mon", "mgr", "osd", "rgw", "run", "log", "crash"):
        (folder / sub).mkdir(parents=True, mode=0o700)
    store = CephStore(host=host, admin=S3Credentials.random(), appliance=S3Credentials.random(), folder=folder)
    started = time.monotonic()
    steps: dict[str, float] = {}

    def step(what: str) -> None:
        steps[what] = round(time.monotonic() - started, 1)

    try:
        fsid = str(uuid.uuid4())
        _write_config(store, fsid)
        keyring = folder / "keyring"
        keyring.unlink(missing_ok=True)
        _gen_key(keyring, "mon.", mon="allow *", create=True)
        _gen_key(keyring, "client.admin", mon="allow *", osd="allow *", mgr="allow *", mds="allow *")
        _gen_key(keyring, "mgr.x", mon="allow profile mgr", osd="allow *", mds="allow *")
        _gen_key(keyring, "client.rgw.gw", mon="allow rw", osd="allow rwx", mgr="allow rw")
        monmap = folder / "monmap"
        run(["monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
             f"[v2:{host.address}:3300,v1:{host.address}:6789]", monmap])  # fmt: skip
        store.in_namespace(
            ["ceph-mon", "-c", store.config, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring]
        )
        _start(store, "mon.a", ["ceph-mon", "-i", "a"])
        _until(store, "the monitor forms a quorum", timeout, lambda: bool(store.ceph("quorum_status", timeout=10)))
        step("mon")
        _start(store, "mgr.x", ["ceph-mgr", "-i", "x"])
        _make_osd(store)
        _start(store, "osd.0", ["ceph-osd", "-i", "0"])
        _until(store, "the OSD is up", timeout, lambda: json.loads(store.ceph("osd", "stat", "-f", "json"))
               .get("num_up_osds") == 1)  # fmt: skip
        step("osd")
        _start(store, "client.rgw.gw", ["radosgw", "-n", "client.rgw.gw"])
        for user, creds, buckets in (("admin", store.admin, "1000"), ("appliance", store.appliance, "-1")):
            # --max-buckets=-1: the appliance user may create no bucket of its own.
            store.radosgw_admin("user", "create", f"--uid={user}", f"--display-name={user}", f"--max-buckets={buckets}",
                                f"--access-key={creds.access_key}", f"--secret={creds.secret_key}")  # fmt: skip
        admin = store.client(store.admin)
        _until(store, "radosgw answers", timeout, lambda: admin.list_buckets() is not None)
        step("rgw")
    except BaseException:
        store.stop()
        raise
    log.info("lab.ceph_up", host=name, endpoint=store.endpoint, seconds=steps)
    return store


def _write_config(store: CephStore, fsid: str) -> None:
    f, address = store.folder, store.host.address
    store.config.write_text(f"""\
[global]
fsid = {fsid}
mon host = [v2:{address}:3300,v1:{address}:6789]
public network = {address}/32
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {f}/keyring
run dir = {f}/run
admin socket = {f}/run/$name.asok
pid file = {f}/run/$name.pid
log file = {f}/log/$name.log
log to stderr = false
err to stderr = true
crash dir = {f}/crash
# One OSD: every pool has one copy, few placement groups, and no warning says so.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000

[mon]
mon data = {f}/mon
mon cluster log file = {f}/log/cluster.log

[mgr]
mgr data = {f}/mgr

[osd]
osd data = {f}/osd
osd objectstore = bluestore
bluestore block path = {f}/osd.block
bluestore block create = true
bluestore block size = {OSD_SIZE}
bluestore fsck on mount = false
osd memory target = 1073741824

[client.rgw.gw]
rgw data = {f}/rgw
rgw frontends = beast endpoint={address}:{store.port}
rgw enable usage log = false
# Quotas checked against fresh bucket stats (the default caches them for 10 minutes): a lab bucket fills now.
rgw bucket quota ttl = 0
rgw user quota bucket sync interval = 0
""")


def _gen_key(keyring: Path, name: str, *, create: bool = False, **caps: str) -> None:
    argv: list[str | Path] = ["ceph-authtool", keyring, "--gen-key", "-n", name]
    if create:
        argv.append("--create-keyring")
    for service, cap in caps.items():
        argv += ["--cap", service, cap]
    run(argv)


def _make_osd(store: CephStore) -> None:
    """Register osd.0 with the monitor (its key given), then make its BlueStore on a sparse file."""
    osd_uuid = str(uuid.uuid4())
    key = run(["ceph-authtool", "--gen-print-key"]).strip()
    secret = store.folder / "osd" / "new.json"
    secret.write_text(json.dumps({"cephx_secret": key}))
    try:
        osd_id = store.ceph("osd", "new", osd_uuid, "-i", str(secret)).strip()
    finally:
        secret.unlink()
    if osd_id != "0":
        raise LabError(f"the new cluster's first OSD got id {osd_id!r}, not 0")
    run(["ceph-authtool", store.folder / "keyring", "-n", "osd.0", "--add-key", key])
    try:
        store.in_namespace(
            ["ceph-osd", "-c", store.config, "-i", "0", "--mkfs", "--key", key, "--osd-uuid", osd_uuid], timeout=120
        )
    except CommandFailed as exc:
        raise LabError(f"ceph-osd --mkfs failed: {exc.last_line} (see {store.log_file('osd.0')})") from exc


def _start(store: CephStore, daemon: str, argv: list[str]) -> None:
    """Start `daemon` in the foreground in the cluster's namespace; its output (beyond its log) in log/NAME.out."""
    with (store.folder / "log" / f"{daemon}.out").open("ab") as out:
        store.processes[daemon] = subprocess.Popen(
            ["ip", "netns", "exec", store.host.netns, *argv, "-f", "-c", str(store.config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=store.folder,
            preexec_fn=die_with_parent,
        )


def _until(store: CephStore, what: str, timeout: float, ready: Any) -> None:
    """Until ready() is true; a daemon that exits meanwhile, or the timeout, fails with its log's tail."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for daemon, process in store.processes.items():
            if process.poll() is not None:
                raise LabError(f"Ceph's {daemon} exited ({process.returncode}) while waiting until {what}: "
                               f"{_tail(store.log_file(daemon))}")  # fmt: skip
        try:
            if ready():
                return
        except Exception as exc:  # noqa: BLE001 - not yet: a refused connection, a timeout, a 503
            last = str(exc)
        time.sleep(0.5)
    raise LabError(f"Ceph: timed out after {timeout:.0f} s waiting until {what} ({last})")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"no log at {path}"
    return f"{path}: " + " | ".join(text.strip().splitlines()[-lines:])


def remove_state(folder: Path) -> None:
    """Throw a stopped cluster's data away (the OSD's file is sparse but may hold gigabytes); its logs stay."""
    for sub in ("mon", "mgr", "osd", "rgw", "run", "crash"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    for name in ("osd.block", "keyring", "monmap"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
