# SPDX-License-Identifier: GPL-2.0-or-later
"""Domain XML for recovery VMs (pure ElementTree, no libvirt connection needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from appliance.domain.recovery import DomainSpec, Network, target_dev

METADATA_NS = "https://github.com/appliance/recovery/1"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def render(spec: DomainSpec, *, emulator: str | None = None, uuid: str | None = None) -> str:
    """The domain XML; `emulator` replaces libvirt's QEMU binary, `uuid` redefines an existing domain."""
    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(domain, "name", spec.name)
    if uuid:
        _sub(domain, "uuid", uuid)
    meta = _sub(domain, "metadata")
    ET.SubElement(meta, f"{{{METADATA_NS}}}recovery", {"host": spec.host, "point": spec.point, "purpose": spec.purpose})
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.cpus))
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    # QEMU runs as root and libvirt leaves file ownership alone: the store stays root-only (0700) and
    # the chain's files are never chowned, relabelled or otherwise touched by starting a VM.
    seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
    _sub(seclabel, "label", "+0:+0")
    devices = _sub(domain, "devices")
    if emulator:
        _sub(devices, "emulator", emulator)
    for index, overlay in enumerate(spec.disks):
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
        _sub(disk, "source", file=overlay)
        _sub(disk, "target", dev=target_dev(spec.disk_bus, index), bus=spec.disk_bus)
        if index == 0:
            _sub(disk, "boot", order="1")
    _network(devices, spec.network)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen="127.0.0.1")
    video = _sub(devices, "video")
    _sub(video, "model", type="vga")
    _sub(devices, "memballoon", model="none")
    ET.register_namespace("appliance", METADATA_NS)
    return ET.tostring(domain, encoding="unicode")


def _network(devices: ET.Element, network: Network) -> None:
    if network.kind == "none":
        return
    if network.kind == "bridge":
        iface = _sub(devices, "interface", type="bridge")
        _sub(iface, "source", bridge=network.bridge)
    else:
        iface = _sub(devices, "interface", type="user")
    _sub(iface, "model", type="virtio")


def vnc_port(live_xml: str) -> int | None:
    """The VNC port libvirt picked for a running domain."""
    graphics = ET.fromstring(live_xml).find("./devices/graphics[@type='vnc']")
    if graphics is None:
        return None
    port = int(graphics.get("port", "-1"))
    return port if port > 0 else None


def mac_addresses(live_xml: str) -> set[str]:
    """The MAC addresses of a domain's network interfaces (libvirt picks them at definition)."""
    macs = (el.get("address", "") for el in ET.fromstring(live_xml).iterfind("./devices/interface/mac"))
    return {mac.lower() for mac in macs if mac}


def recovery_metadata(xml: str) -> dict[str, str] | None:
    el = ET.fromstring(xml).find(f"./metadata/{{{METADATA_NS}}}recovery")
    return dict(el.attrib) if el is not None else None
