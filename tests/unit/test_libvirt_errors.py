# SPDX-License-Identifier: GPL-2.0-or-later
"""A libvirt error no method handled itself (libvirtd gone mid-call) still reaches the user as one line."""

from __future__ import annotations

import libvirt
import pytest

from appliance.adapters.libvirt_host import LibvirtHypervisor
from appliance.errors import HypervisorError


class _VanishingDomain:
    def isActive(self) -> bool:  # noqa: N802 - libvirt's name
        # libvirtError takes its message from the thread's last libvirt error, if any: start from none, as
        # an earlier test's failed connection would otherwise speak instead.
        libvirt.virResetLastError()
        raise libvirt.libvirtError("End of file while reading data: Input/output error")


def test_an_unhandled_libvirt_error_becomes_a_hypervisor_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hv = LibvirtHypervisor("test:///default")  # libvirt's own test driver: no daemon needed
    monkeypatch.setattr(hv, "_domain", lambda name: _VanishingDomain())
    with pytest.raises(HypervisorError, match="libvirt failed at destroy_keep recovery-web1: End of file"):
        hv.destroy_keep("recovery-web1")
    monkeypatch.undo()
    assert hv.state("no-such-domain").state == "gone"  # the real driver answers through the same wrapper
