# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's self-signed TLS certificate, made on its first start (cryptography): an ECDSA P-256 key
and a certificate naming this machine, localhost and the address the console listens on."""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 5 * 365


def make_self_signed(cert: Path, key: Path, listen_host: str) -> None:
    """Write a new key (0600) and a certificate for it to `key` and `cert`."""
    private = ec.generate_private_key(ec.SECP256R1())
    name = socket.getfqdn() or "appliance"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "instant-recovery appliance")])  # fmt: skip
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_names(name, listen_host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )  # fmt: skip
    pem_key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())  # fmt: skip
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem_key)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _names(name: str, listen_host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]  # fmt: skip
    try:
        address = ipaddress.ip_address(listen_host)
        if not address.is_unspecified and str(address) != "127.0.0.1":
            names.append(x509.IPAddress(address))
    except ValueError:
        if listen_host and listen_host not in (name, "localhost"):
            names.append(x509.DNSName(listen_host))
    return names
