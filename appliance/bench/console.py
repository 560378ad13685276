# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench console`: how fast the console answers, and its memory, as the number of hosts grows.

Each page of the console reads the store afresh at every refresh (every 3 s per open page) and every
Prometheus scrape does the same, so what one answer costs with many hosts and long chains is what the
appliance pays for being watched. The run builds a home of its own with N hosts of P points each (records
and catalogs as the store writes them; no disk files: no answer reads them), starts `appliance web` on it,
and times each kind of answer (median of 20, over one kept-alive TLS connection) beside the floor of the
same server: a static file. Peak RSS of the console process after the run (VmHWM).
"""

from __future__ import annotations

import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.domain.chain import Chain
from appliance.domain.models import DiskPoint, Host, HostKey, Point, Verification
from appliance.lab.console import free_port, get, wait_up
from appliance.store import catalog, hosts
from appliance.store.layout import Home

REPEAT = 20
ASKED = ["/static/console.css", "/api/v1/hosts", "/api/v1/overview", "/parts/overview", "/api/v1/hosts/host000",
         "/metrics"]  # fmt: skip


def run_console_bench(sizes: list[tuple[int, int]]) -> None:
    rows = []
    for count, depth in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-console-") as folder:
            home = Path(folder) / "home"
            _fill(Home(home), count, depth)
            rows.append((count, depth, *_measure(home)))
    print("\n| hosts x points | " + " | ".join(ASKED) + " | console peak RSS |")
    print("|---|" + "---|" * (len(ASKED) + 1))
    for count, depth, times, rss in rows:
        cells = " | ".join(f"{times[path] * 1000:.1f} ms" for path in ASKED)
        print(f"| {count} x {depth} | {cells} | {rss / 1024:.0f} MiB |")


def _fill(home: Home, count: int, depth: int) -> None:
    home.root.mkdir(parents=True)
    start = datetime.now(UTC) - timedelta(minutes=15 * depth)
    for n in range(count):
        name = f"host{n:03d}"
        hosts.save(home, Host(name=name, address="192.0.2.1", user="root", port=22, key_file=f"keys/{name}",
                              host_key=HostKey("ssh-ed25519", "AAAA", "SHA256:bench"), disks=("/dev/vda",),
                              interval=900.0))  # fmt: skip
        points = tuple(_point(start + timedelta(minutes=15 * i)) for i in range(depth))
        home.chain_dir(name).mkdir(parents=True)
        catalog.save(home.chain_dir(name), Chain(name, points))


def _point(moment: datetime) -> Point:
    ident = moment.strftime("%Y%m%dT%H%M%SZ")
    disk = DiskPoint("disk0", "/dev/vda", f"disk0/{ident}.qcow2", 64 << 30, 32768, "0" * 64, 64 << 30, 1 << 28, 1 << 28)
    return Point(ident, moment, 42.0, (disk,), verification=Verification(moment, True, "ok"))


def _measure(home: Path) -> tuple[dict[str, float], int]:
    cli = [sys.executable, "-m", "appliance", "--home", str(home)]
    subprocess.run([*cli, "user", "add", "bench", "--role", "viewer", "--password-stdin"], input="bench passphrase\n",
                   text=True, check=True, capture_output=True)  # fmt: skip
    token = subprocess.run([*cli, "user", "token", "create", "bench"], text=True, check=True,
                           capture_output=True).stdout.strip()  # fmt: skip
    port = free_port()
    server = subprocess.Popen([*cli, "web", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        trust = wait_up(home / "web" / "cert.pem", port)
        times = {path: _median(trust, port, path, token) for path in ASKED}
        return times, _peak_rss(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def _median(trust: ssl.SSLContext, port: int, path: str, token: str) -> float:
    get(trust, port, path, token)  # warm: the first answer imports and compiles templates
    seconds = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        get(trust, port, path, token)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def _peak_rss(pid: int) -> int:
    """KiB: the console process's VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
