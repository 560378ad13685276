# SPDX-License-Identifier: GPL-2.0-or-later
"""Use cases: each orchestrates the store and the ports for one thing a user asks for."""
