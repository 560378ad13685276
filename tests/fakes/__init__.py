# SPDX-License-Identifier: GPL-2.0-or-later
"""Fakes of the ports (appliance/ports.py) for unit tests of the use cases, as restic's mem backend.

FakeImages (ImageTool) keeps images as plain files, LocalShell (RemoteShell) runs the real reader as a
local process, FakeHypervisor (Hypervisor) is a small state machine. The contract test
(tests/integration/test_image_tool_contract.py) holds FakeImages to QEMU's behaviour.
"""

from tests.fakes.bucket import FakeBucket as FakeBucket
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.images import FakeImages
from tests.fakes.shell import HOST_KEY, LocalShell

__all__ = ["HOST_KEY", "FakeHypervisor", "FakeImages", "LocalShell"]
