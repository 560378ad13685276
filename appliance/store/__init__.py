# SPDX-License-Identifier: GPL-2.0-or-later
"""State the appliance owns on its own disk: host records, chains, hash lists, locks."""
