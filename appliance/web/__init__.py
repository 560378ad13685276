# SPDX-License-Identifier: GPL-2.0-or-later
"""The web console: pages, the JSON API, /metrics and the recovery VMs' screens (FastAPI, Jinja2, htmx, noVNC)."""
