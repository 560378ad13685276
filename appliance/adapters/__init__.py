# SPDX-License-Identifier: GPL-2.0-or-later
"""Adapters: the only code that talks to external systems (SSH, qemu-img, qemu-storage-daemon, libvirt).

Each wraps one system behind a small interface and turns that system's failures into appliance errors.
"""
