# SPDX-License-Identifier: GPL-2.0-or-later
"""The Vagrant lab's Vagrantfile is valid for the libvirt provider, and validating it has no side effects.

`vagrant validate` loads the Vagrantfile with the real vagrant-libvirt plugin (Debian installs it
system-wide, so a fresh VAGRANT_HOME still finds it) and checks every machine's settings, without
downloading a box or creating a VM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

VAGRANT_DIR = ROOT / "vagrant"


def test_vagrantfile_validates_without_generating_keys(tmp_path: Path) -> None:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.fail("vagrant is not installed: run ./install --dev (it installs vagrant and vagrant-libvirt)")
    keys = VAGRANT_DIR / ".keys"
    had_keys = keys.exists()  # left by a developer's earlier `vagrant up`; not ours to judge
    env = {
        **os.environ,
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        # Keep the user's ~/.vagrant.d and the tree's vagrant/.vagrant untouched.
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }

    r = subprocess.run([vagrant, "validate"], cwd=VAGRANT_DIR, env=env, capture_output=True, text=True, timeout=120)

    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout, r.stdout + r.stderr
    if not had_keys:
        assert not keys.exists(), "vagrant validate generated SSH keys; only up/provision/reload may"
