# SPDX-License-Identifier: GPL-2.0-or-later
"""Transfer: the appliance's half of the reader's wire protocol (pure, no SSH)."""
