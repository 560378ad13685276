# SPDX-License-Identifier: GPL-2.0-or-later
"""The pure model: hosts, points, chains, blocks. No I/O and no external systems."""
