# SPDX-License-Identifier: GPL-2.0-or-later
"""The demo's look at the web console: `appliance web` started, asked a few things with a token over TLS
(checked against the console's own certificate), stopped."""

from __future__ import annotations

import json
import shlex
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from appliance.errors import LabError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ask_console(argv: list[str], home: Path, token: str, port: int, paths: list[str]) -> None:
    print(f"\n$ {shlex.join(['appliance', *argv[argv.index('web') :]])} &", flush=True)
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        trust = wait_up(home / "web" / "cert.pem", port, server)
        for path in paths:
            print(f"\n$ curl --cacert {home}/web/cert.pem -H 'Authorization: Bearer apl_...' "
                  f"https://127.0.0.1:{port}{path}", flush=True)  # fmt: skip
            print(_shown(path, get(trust, port, path, token).decode()), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_up(cert: Path, port: int, server: subprocess.Popen[str] | None = None) -> ssl.SSLContext:
    """Once the console answers: a TLS context that trusts its own certificate."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise LabError(f"the console stopped: {server.stderr.read() if server.stderr else ''}")
        if cert.exists():
            trust = ssl.create_default_context(cafile=str(cert))
            try:
                get(trust, port, "/login", "")
                return trust
            except OSError:
                pass
        time.sleep(0.3)
    raise LabError("the console did not answer within 30 s")


def get(trust: ssl.SSLContext, port: int, path: str, token: str) -> bytes:
    """One answer of the console on 127.0.0.1, with an API token if given."""
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, context=trust, timeout=60) as answer:
        body: bytes = answer.read()
    return body


def _shown(path: str, body: str) -> str:
    """The hosts as one line each; of the metrics, the lab host's and the store's."""
    if path.endswith("/hosts"):
        return "\n".join(f"{h['name']}: {h['state']}, newest point {h['newest']}, {h['points']} points, "
                         f"verification {h['verification']}" for h in json.loads(body))  # fmt: skip
    return "\n".join(line for line in body.splitlines() if line.startswith(("appliance_host_", "appliance_store_")))
