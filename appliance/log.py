# SPDX-License-Identifier: GPL-2.0-or-later
"""Logging policy: structlog events with stable dotted names, to stderr.

Stdout is kept for command results (tables, `--json`). Events read `point.created`,
`backup.failed`, ...; their key-value context is the contract for `--log-json` consumers.
Secrets never reach a log: the redaction processor drops keys that could hold one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_KEYS = frozenset({"password", "passphrase", "private_key", "secret"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _SECRET_KEYS & event.keys():
        event[key] = "***"
    return event


def configure(*, json: bool = False, level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog once per process; `json` gives one JSON object per line; `stream`: where to (stderr)."""
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
