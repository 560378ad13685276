# SPDX-License-Identifier: GPL-2.0-or-later
"""Composition root: the one place that picks concrete adapters for the ports."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.adapters.images import QemuImages
from appliance.adapters.libvirt_host import LibvirtHypervisor
from appliance.adapters.mail import MailSender
from appliance.adapters.nbdkit import NbdkitServer
from appliance.adapters.ssh import ParamikoShell
from appliance.adapters.webhook import WebhookSender
from appliance.domain.alerts import MAIL, Channel, Message
from appliance.ports import BucketAccess, ObjectStorage, PasswordHasher, Tools
from appliance.store.layout import Home

DEFAULT_HOME = "/var/lib/appliance"
DEFAULT_LIBVIRT_URI = "qemu:///system"


def home(override: str | None = None) -> Home:
    return Home(Path(override or os.environ.get("APPLIANCE_HOME") or DEFAULT_HOME))


def tools(home: Home) -> Tools:
    uri = os.environ.get("APPLIANCE_LIBVIRT_URI") or DEFAULT_LIBVIRT_URI
    # Another QEMU binary for recovery VMs (libvirt's `<emulator>`): a newer build, or a wrapper that
    # makes KVM fail on purpose to test the fallback to TCG on a machine where KVM works.
    emulator = os.environ.get("APPLIANCE_QEMU_EMULATOR") or None
    hypervisor = LibvirtHypervisor(uri, emulator=emulator)
    return Tools(
        remote=ParamikoShell(home.root),
        images=QemuImages(),
        hypervisor=hypervisor,
        buckets=_bucket,
        block_server=NbdkitServer(),
        notifier=ChannelNotifier(),
    )


class ChannelNotifier:
    """The Notifier port: each channel through the adapter of its kind."""

    def __init__(self) -> None:
        self.mail, self.webhook = MailSender(), WebhookSender()

    def send(self, channel: Channel, secret: str, message: Message) -> None:
        (self.mail if channel.kind == MAIL else self.webhook).send(channel, secret, message)


def _bucket(access: BucketAccess) -> ObjectStorage:
    """boto3 is imported only by commands that reach a bucket (it adds half a second to every start)."""
    from appliance.adapters.s3 import S3Bucket

    return S3Bucket(access)


def passwords() -> PasswordHasher:
    from appliance.adapters.passwords import Argon2Passwords

    return Argon2Passwords()


def self_signed_certificate(cert: Path, key: Path, listen_host: str) -> None:
    from appliance.adapters.tls import make_self_signed

    make_self_signed(cert, key, listen_host)
