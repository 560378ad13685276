# SPDX-License-Identifier: GPL-2.0-or-later
"""Instant-recovery appliance: incremental qcow2 recovery points over SSH, booted as libvirt VMs."""

__version__ = "0.1.0"
