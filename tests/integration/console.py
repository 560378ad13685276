# SPDX-License-Identifier: GPL-2.0-or-later
"""The web console as a user runs it: `appliance web` in its own process over TLS, and its users."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.lab.console import free_port
from tests.conftest import run_cli

PASSWORDS = {"alice": "alice's long passphrase", "oscar": "oscar's long passphrase", "victor": "victor's passphrase"}
ROLES = {"alice": "admin", "oscar": "operator", "victor": "viewer"}


@dataclass
class RunningConsole:
    url: str
    cert: Path
    process: subprocess.Popen[str]
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        trust = ssl.create_default_context(cafile=str(self.cert))  # the console's own self-signed certificate
        return httpx.Client(base_url=self.url, verify=trust, timeout=60, **kwargs)  # type: ignore[arg-type]

    def login(self, user: str, password: str | None = None) -> httpx.Client:
        """A client holding a session of `user`, with the session's CSRF token as a default header."""
        client = self.client()
        r = client.post("/login", data={"user": user, "password": password or PASSWORDS[user], "next": "/"})
        assert r.status_code == 303, r.text
        page = client.get("/").text
        token = page.split('"X-CSRF-Token": "', 1)[1].split('"', 1)[0]
        client.headers["X-CSRF-Token"] = token
        return client


def add_users(home: Path) -> None:
    for user, role in ROLES.items():
        r = run_cli(home, "user", "add", user, "--role", role, "--password-stdin", stdin=PASSWORDS[user] + "\n")
        assert r.rc == 0, r.err


@contextmanager
def console(home: Path, *extra: str) -> Iterator[RunningConsole]:
    port = free_port()
    log = home.parent / f"web-{port}.log"
    with log.open("w") as out:
        argv = [sys.executable, "-m", "appliance", "--home", str(home), "web", "--listen", f"127.0.0.1:{port}", *extra]
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
    running = RunningConsole(f"https://127.0.0.1:{port}", home / "web" / "cert.pem", process, log)
    try:
        _wait_up(running)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_up(running: RunningConsole) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise AssertionError(f"the console stopped: {running.log.read_text()}")
        if running.cert.exists():
            try:
                with running.client() as c:
                    c.get("/login")
                return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the console did not answer: {running.log.read_text()}")
