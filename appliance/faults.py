# SPDX-License-Identifier: GPL-2.0-or-later
"""Deterministic faults for the tests (as borg's failing chunker: fault injection in the product).

`APPLIANCE_CRASH_AT=name` or `name:n` kills the process with SIGKILL the (n-th) time it reaches the
checkpoint `name`: no cleanup, no finally blocks, exactly like a power cut of the appliance process.
`APPLIANCE_FAULT=name` makes `fault(name)` true once: the code then misbehaves the way `name` says (a
corrupted write, a missed block), so that a test proves a check catches it. `APPLIANCE_PAUSE=name:seconds`
makes `pause(name)` say how long to stop there (a freeze held on purpose, to kill what holds it). Unset (always, outside
tests), each costs one comparison.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("APPLIANCE_CRASH_AT", "")
_name, _, _count = _spec.partition(":")
_left = int(_count or 1)


def checkpoint(name: str) -> None:
    global _left
    if not _spec or name != _name:
        return
    _left -= 1
    if _left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


_fault = os.environ.get("APPLIANCE_FAULT", "")
_fired: set[str] = set()


def fault(name: str) -> bool:
    if name != _fault or name in _fired:
        return False
    _fired.add(name)
    return True


_pause_name, _, _pause_seconds = os.environ.get("APPLIANCE_PAUSE", "").partition(":")


def pause(name: str) -> float:
    return float(_pause_seconds or 0) if name == _pause_name else 0.0
