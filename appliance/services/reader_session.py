# SPDX-License-Identifier: GPL-2.0-or-later
"""Starting the code the appliance ships to a machine (the reader on a host, the writer on a failback
target) and naming what went wrong when it stops early."""

from __future__ import annotations

from appliance.agent import reader_source, wire
from appliance.domain.models import Host
from appliance.errors import ApplianceError, ConnectionLostError, ProtocolViolationError, RemoteCommandError
from appliance.ports import RemoteSession, RemoteStream
from appliance.transfer.protocol import MAX_MESSAGE, ProtocolError, printable


def start_agent(session: RemoteSession, python: str, source: bytes, bootstrap: str) -> RemoteStream:
    """Run the one fixed bootstrap command and send the agent's code over its stdin: nothing is installed
    on the machine, and the code always matches the appliance."""
    stream = session.start([python, "-c", bootstrap, str(len(source))])
    stream.write(source)
    return stream


def start_reader(session: RemoteSession, host: Host) -> RemoteStream:
    return start_agent(session, host.python, reader_source(), wire.READER_BOOTSTRAP)


def how_it_ended(stream: RemoteStream, limit: int = MAX_MESSAGE) -> tuple[int, str]:
    """The command's exit status (-1: none came, the link broke) and the last line of its stderr, made safe
    to show on one line."""
    status = stream.wait(timeout=5)
    stderr = stream.stderr_text().strip()
    return status, printable(stderr.splitlines()[-1], limit) if stderr else ""


def ended_early(host: Host, stream: RemoteStream, starting: bool) -> ApplianceError:
    """The error to show when the reader's output stops before it should."""
    status, last = how_it_ended(stream)
    if status == 127 or (starting and "not found" in last):
        return RemoteCommandError(
            f"{host.python} was not found on {host.name}",
            hint="the protected host needs python3 (standard library only); install it or set --python",
        )
    if starting and status > 0:
        return RemoteCommandError(f"the reader failed to start on {host.name} (exit {status}): {last}")
    if status > 0 and last:  # it ended on its own, and said why (a crash's last line, say)
        return ConnectionLostError(f"the reader on {host.name} stopped during the transfer (exit {status}): {last}")
    return ConnectionLostError(f"the connection to {host.name} broke during the transfer")


def violation(host: Host, exc: ProtocolError | str) -> ProtocolViolationError:
    """The host sent what the reader never sends: say what, as one line, and that nothing was recorded."""
    return ProtocolViolationError(f"{host.name} sent what the appliance's reader never sends: {exc}")
