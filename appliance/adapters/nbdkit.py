# SPDX-License-Identifier: GPL-2.0-or-later
"""BlockServer over nbdkit: its Python plugin (appliance/nbdkit_plugin.py) serves a cloud point's disk.

nbdkit does the NBD protocol, the Unix socket and the threads; the plugin only answers reads. nbdkit forks
into the background once its socket listens and writes its pid file then, so when `start` returns QEMU can
connect. The plugin runs in nbdkit's embedded python3 (Debian's, the same 3.11 as the appliance's
virtualenv), which is handed the virtualenv's site-packages to import the appliance and its libraries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sysconfig
import time
from pathlib import Path

from appliance.adapters.process import CommandFailed, run
from appliance.errors import FailoverError
from appliance.log import get_logger

log = get_logger(__name__)

PLUGIN = Path(__file__).resolve().parents[1] / "nbdkit_plugin.py"
THREADS = 8


class NbdkitServer:
    def start(self, socket: Path, pidfile: Path, log_file: Path, params: dict[str, str]) -> None:
        socket.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
        site = sysconfig.get_paths()["purelib"]
        argv = ["nbdkit", "--unix", str(socket), "--pidfile", str(pidfile), "--readonly", "--threads", str(THREADS),
                "python", str(PLUGIN), f"site={site}", f"log={log_file}",
                *(f"{k}={v}" for k, v in params.items())]  # fmt: skip
        try:
            run(argv, timeout=120)
        except CommandFailed as exc:
            tail = _tail(log_file)
            raise FailoverError(f"the NBD server for the cloud point did not start: {exc.last_line}"
                                + (f" ({tail})" if tail else "")) from exc  # fmt: skip
        log.info("nbdkit.started", socket=str(socket), pid=_pid(pidfile))

    def stop(self, pidfile: Path) -> None:
        pid = _pid(pidfile)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
        log.info("nbdkit.stopped", pid=pid)

    def running(self, pidfile: Path) -> bool:
        pid = _pid(pidfile)
        if pid is None:
            return False
        try:
            return "nbdkit" in Path(f"/proc/{pid}/comm").read_text()
        except OSError:
            return False


def _pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path) -> str:
    try:
        lines = [x for x in path.read_text().splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""
