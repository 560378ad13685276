# SPDX-License-Identifier: GPL-2.0-or-later
"""Serving the console with uvicorn over TLS, in the foreground (`appliance web`) or in a thread of the
daemon (`appliance daemon --web`)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from appliance import bootstrap
from appliance.errors import WebError
from appliance.log import get_logger
from appliance.store import console as console_files
from appliance.web.app import create_app
from appliance.web.deps import Console

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        """'0.0.0.0:8443', ':8443' (every address), '[::1]:8443', 'localhost:8443'."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise WebError(f"invalid listen address {text!r}: use HOST:PORT, e.g. 0.0.0.0:8443 or :8443")
        host = host.strip("[]") or "0.0.0.0"
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not host.replace("-", "").replace(".", "").isalnum():
                raise WebError(f"invalid listen address {text!r}: {host!r} is not a host name") from None
        return cls(host, int(port))


def tls_files(console: Console, listen: Listen, cert: Path | None, key: Path | None) -> tuple[Path, Path]:
    """The certificate and key given, or the console's own self-signed pair (made on the first start)."""
    if (cert is None) != (key is None):
        raise WebError("give both --cert and --key, or neither (a self-signed certificate is made)")
    if cert is not None and key is not None:
        for path in (cert, key):
            if not path.is_file():
                raise WebError(f"cannot read {path}")
        return cert, key
    own_cert, own_key = console_files.tls_files(console.home)
    if not own_cert.exists() or not own_key.exists():
        bootstrap.self_signed_certificate(own_cert, own_key, listen.host)
        log.info("web.certificate_made", cert=str(own_cert))
    return own_cert, own_key


def make_server(console: Console, listen: Listen, cert: Path, key: Path) -> uvicorn.Server:
    _check_free(listen)
    config = uvicorn.Config(create_app(console), host=listen.host, port=listen.port, ssl_certfile=str(cert),
                            ssl_keyfile=str(key), log_config=None, access_log=False, ws="websockets-sansio",
                            proxy_headers=False, server_header=False)  # fmt: skip
    return uvicorn.Server(config)


def _check_free(listen: Listen) -> None:
    """Say "address in use" as one line before uvicorn would log it and exit on its own."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listen.host, listen.port))
        except OSError as exc:
            raise WebError(f"cannot listen on {listen.host}:{listen.port}: {exc.strerror}") from exc


def serve_in_thread(server: uvicorn.Server) -> threading.Thread:
    """Run the console beside the scheduler (uvicorn installs no signal handlers outside the main thread);
    `server.should_exit = True` stops it."""
    thread = threading.Thread(target=server.run, name="web console", daemon=True)
    thread.start()
    return thread
