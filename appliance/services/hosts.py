# SPDX-License-Identifier: GPL-2.0-or-later
"""Adding and changing protected hosts: pinning the host key, checking that capture can work."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from appliance.domain.models import DEFAULT_BLOCK_SIZE, Host, HostKey, parse_address, validate_new_host_name
from appliance.errors import ConfigError, DiskAccessError, HostKeyError, HostNotFoundError, RemoteCommandError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.services.reader_session import ended_early, start_reader, violation
from appliance.store import hosts
from appliance.store.layout import Home
from appliance.transfer import protocol

log = get_logger(__name__)

ConfirmKey = Callable[[HostKey], bool]


def pin_host_key(
    tools: Tools, address: str, port: int, *, fingerprint: str | None, trust_first_use: bool, confirm: ConfirmKey | None
) -> HostKey:
    """Decide which host key to pin. Never silent: a given fingerprint, an explicit TOFU, or a human's yes.

    :raises HostKeyError: the key differs from the given fingerprint, or nobody vouched for it.
    """
    seen = tools.remote.scan_host_key(address, port)
    if fingerprint:
        wanted = fingerprint if fingerprint.startswith("SHA256:") else f"SHA256:{fingerprint}"
        if wanted.rstrip("=") != seen.fingerprint:
            raise HostKeyError(
                f"{address}:{port} presented host key {seen.fingerprint} ({seen.key_type}), "
                f"not the expected {wanted}; refusing to pin it"
            )
        return seen
    if trust_first_use:
        log.warning("hostkey.trusted_first_use", address=address, port=port, fingerprint=seen.fingerprint)
        return seen
    if confirm is not None and confirm(seen):
        return seen
    raise HostKeyError(
        f"{address}:{port} presented an unknown host key {seen.fingerprint} ({seen.key_type}); not pinned",
        hint="check it on the host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and pass "
        "--host-key-fingerprint, or pass --trust-first-use",
    )


def add_host(
    home: Home,
    tools: Tools,
    *,
    name: str,
    address: str,
    port: int | None,
    disks: Sequence[str],
    key: Path,
    pre_hook: Sequence[str] = (),
    post_hook: Sequence[str] = (),
    fingerprint: str | None = None,
    trust_first_use: bool = False,
    confirm: ConfirmKey | None = None,
    python: str = "python3",
    timeout: float = 60.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[Host, protocol.Hello]:
    """Register a protected host: pin its key, check that the appliance can log in and read every disk.

    :raises ConfigError, HostKeyError, RemoteError:
    """
    validate_new_host_name(name)
    if hosts.exists(home, name):
        raise ConfigError(f"a host named {name!r} already exists", hint=f"change it with `appliance host set {name}`")
    user, address_only, final_port = parse_address(address, port)
    _check_disks(disks)
    if not key.is_file():
        raise ConfigError(f"SSH key {key} does not exist")
    host_key = pin_host_key(
        tools, address_only, final_port, fingerprint=fingerprint, trust_first_use=trust_first_use, confirm=confirm
    )
    key_file = hosts.install_key(home, name, key)
    host = Host(
        name=name,
        address=address_only,
        user=user,
        port=final_port,
        key_file=key_file,
        host_key=host_key,
        disks=tuple(disks),
        pre_hook=tuple(pre_hook),
        post_hook=tuple(post_hook),
        python=python,
        block_size=block_size,
        timeout=timeout,
    )
    try:
        hello = probe(tools, host)
    except BaseException:
        hosts.remove(home, name)
        raise
    hosts.save(home, host)
    log.info("host.added", host=name, address=address_only, port=final_port, fingerprint=host_key.fingerprint)
    return host, hello


def set_host(home: Home, tools: Tools, name: str, **changes: object) -> Host:
    """Change a host's settings; a new address or fingerprint re-pins the key the same careful way."""
    host = hosts.load(home, name)
    fingerprint = changes.pop("fingerprint", None)
    trust = bool(changes.pop("trust_first_use", False))
    key = changes.pop("key", None)
    if "address" in changes or "port" in changes:
        user, address_only, final_port = parse_address(
            str(changes.pop("address", f"{host.user}@{host.address}")),
            changes.pop("port", None),  # type: ignore[arg-type]
        )
        changes.update(user=user, address=address_only, port=final_port)
    if "disks" in changes:
        _check_disks(changes["disks"])  # type: ignore[arg-type]
    host = dataclasses.replace(host, **changes)  # type: ignore[arg-type]
    moved = "address" in changes
    if fingerprint or trust or moved:
        host = dataclasses.replace(
            host,
            host_key=pin_host_key(
                tools,
                host.address,
                host.port,
                fingerprint=str(fingerprint) if fingerprint else None,
                trust_first_use=trust,
                confirm=None,
            ),
        )
    if key is not None:
        host = dataclasses.replace(host, key_file=hosts.install_key(home, name, Path(str(key))))
    hosts.save(home, host)
    log.info("host.changed", host=name, fields=sorted(changes))
    return host


def remove_host(home: Home, name: str, *, purge: bool) -> None:
    """Forget a host; with `purge`, delete every file of it too (refused while a job runs or a point is in use).

    The record is not read: a damaged one can be removed like any other."""
    if not hosts.exists(home, name):
        raise HostNotFoundError(f"no protected host named {name!r}")
    if purge:
        hosts.purge(home, name)
    hosts.remove(home, name)
    log.info("host.removed", host=name, purged=purge)


def probe(tools: Tools, host: Host) -> protocol.Hello:
    """Log in and ask the reader about each disk (no hooks, no data read).

    :raises DiskAccessError: a disk is missing or unreadable and no pre hook could explain it.
    """
    with tools.remote.connect(host) as session:
        stream = start_reader(session, host)
        disks = [(d, host.block_size) for d in host.disks]
        stream.write(protocol.encode_request(disks, probe=True, consistency=host.consistency))
        records = protocol.RecordReader(stream.recv_some)
        try:
            hello = records.next()
        except EOFError:
            raise ended_early(host, stream, starting=True) from None
        except protocol.ProtocolError as exc:
            raise violation(host, exc) from exc
        stream.wait()
    if not isinstance(hello, protocol.Hello):
        raise RemoteCommandError(f"{host.name}: the reader answered the probe with {type(hello).__name__}")
    for disk in hello.disks:
        if disk.error and not host.pre_hook:
            raise DiskAccessError(
                f"{host.name}: {disk.error}", hint="give the disk as a block device or image file path on the host"
            )
        if disk.error:
            log.warning("host.disk_not_there_yet", host=host.name, disk=disk.path, error=disk.error)
    return hello


def _check_disks(disks: Sequence[str]) -> None:
    if not disks:
        raise ConfigError("give at least one --disk (a block device or image file on the host)")
    for d in disks:
        if not d.startswith("/"):
            raise ConfigError(f"disk {d!r} must be an absolute path on the host, like /dev/sda")
    if len(set(disks)) != len(disks):
        raise ConfigError("the same disk is given twice")
