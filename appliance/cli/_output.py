# SPDX-License-Identifier: GPL-2.0-or-later
"""Presentation helpers: sizes, tables, the progress line."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from typer.core import TyperGroup

from appliance.domain.models import format_size as size
from appliance.errors import DamagedFileError
from appliance.services.backup import BackupProgress


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


class ProgressLine:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, p: BackupProgress) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and p.read < p.total):
            return
        self._last = now
        pct = 100.0 * p.read / p.total if p.total else 100.0
        sys.stderr.write(
            f"\r{self.label}: read {size(p.read)} of {size(p.total)} ({pct:3.0f}%)  "
            f"received {size(p.received)}  {size(p.rate)}/s   "
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\n")


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TB": 1 << 40,
    "TIB": 1 << 40,
}


def parse_size(text: str) -> int:
    """'2G', '512MiB', '1048576' -> bytes (binary units, as qemu-img reads them)."""
    from appliance.errors import ConfigError

    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    unit = t[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"invalid size {text!r}: use e.g. 512M, 2G") from None
    if unit not in _UNITS or value <= 0:
        raise ConfigError(f"invalid size {text!r}: use e.g. 512M, 2G")
    return int(value * _UNITS[unit])


def raise_unreadable(unreadable: Mapping[str, DamagedFileError]) -> None:
    """After a listing that showed everything readable: the records that were not, as one error line."""
    if len(unreadable) == 1:
        raise next(iter(unreadable.values()))
    if unreadable:
        raise DamagedFileError("; ".join(exc.message for exc in unreadable.values()))


class HostOrCommand(TyperGroup):
    """`failover web1` means `failover boot web1` (the first command of the group): the command users type
    on the worst day is the short one."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = [next(iter(self.commands)), *args]
        result: list[str] = super().parse_args(ctx, args)
        return result
