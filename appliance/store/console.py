# SPDX-License-Identifier: GPL-2.0-or-later
"""The web console's files under APPLIANCE_HOME/web/ (0700): its users, tokens and TLS key (0600)."""

from __future__ import annotations

from pathlib import Path

from appliance.store.files import private_dir
from appliance.store.layout import Home


def folder(home: Home) -> Path:
    return private_dir(home.root / "web")


def tls_files(home: Home) -> tuple[Path, Path]:
    """(certificate, key) of the console's self-signed certificate."""
    return folder(home) / "cert.pem", folder(home) / "key.pem"
