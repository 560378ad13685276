# SPDX-License-Identifier: GPL-2.0-or-later
"""Running local programs: always an argv list (never a shell string), failures with their stderr."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from appliance.log import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1


class CommandFailed(Exception):
    """A program exited non-zero; the adapter that ran it turns this into an appliance error."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{argv[0]} exited {returncode}: {self.last_line}")

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"


def run(
    argv: Sequence[str | Path], *, timeout: float | None = None, cwd: Path | None = None, ok: tuple[int, ...] = (0,)
) -> str:
    """Run argv to completion and return its stdout; raise CommandFailed on an exit status not in `ok`."""
    args = [str(a) for a in argv]
    log.debug("process.run", argv=args)
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    except FileNotFoundError as exc:
        raise CommandFailed(args, 127, f"{args[0]}: not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(args, -1, f"timed out after {timeout} s") from exc
    if done.returncode not in ok:
        raise CommandFailed(args, done.returncode, done.stderr or done.stdout)
    return done.stdout


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the appliance dies, so no daemon outlives a killed run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
