# SPDX-License-Identifier: GPL-2.0-or-later
"""The recovery VMs' screens in the browser: a WebSocket (noVNC's transport) relayed to the VM's VNC server.

libvirt gives each recovery VM a VNC server on 127.0.0.1 only; this relay is the one way to it from
outside, and it opens only for a logged-in operator (session cookie from a page of this console, or a
token), only to a recovery VM the appliance recorded, and only to the port libvirt reports for it now.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from appliance.domain.users import OPERATOR, allows
from appliance.log import get_logger
from appliance.store import recovery
from appliance.web.deps import console_of, principal_of

log = get_logger(__name__)
router = APIRouter(include_in_schema=False)
POLICY_VIOLATION = 1008
CHUNK = 64 << 10


@router.websocket("/vms/{name}/vnc")
async def vnc(websocket: WebSocket, name: str) -> None:
    who = principal_of(websocket)
    if who is None or not allows(who.role, OPERATOR) or not _same_origin(websocket):
        log.warning("console.vnc_refused", host=name, user=who.user if who else "")
        await websocket.close(code=POLICY_VIOLATION)
        return
    target = await asyncio.to_thread(_vnc_of, websocket, name)
    if target is None:
        await websocket.close(code=POLICY_VIOLATION, reason="no running recovery VM")
        return
    host, _, port = target.rpartition(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        await websocket.close(code=1011, reason="the VM's screen cannot be reached")
        return
    await websocket.accept(subprotocol="binary" if "binary" in websocket.scope.get("subprotocols", []) else None)
    log.info("console.vnc_opened", host=name, user=who.user)
    try:
        await _relay(websocket, reader, writer)
    finally:
        writer.close()
        log.info("console.vnc_closed", host=name, user=who.user)


def _same_origin(websocket: WebSocket) -> bool:
    """A browser always sends Origin on a WebSocket: it must be this console (no other site's page)."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True  # not a browser (a script with a token)
    return origin.split("://", 1)[-1] == websocket.headers.get("host")


def _vnc_of(websocket: WebSocket, name: str) -> str | None:
    """127.0.0.1:PORT of the host's running failover VM, as libvirt reports it now; None if there is none."""
    console = console_of(websocket)
    try:
        vm = recovery.load(console.home, name, "failover")
    except Exception:  # a bad name or a damaged record: no VM to show
        return None
    if vm is None:
        return None
    display = console.tools.hypervisor.vnc_display(vm.name)
    return display if display.startswith("127.0.0.1:") else None


async def _relay(websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def to_vm() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                writer.write(await websocket.receive_bytes())
                await writer.drain()

    async def to_browser() -> None:
        while data := await reader.read(CHUNK):
            await websocket.send_bytes(data)

    tasks = [asyncio.create_task(to_vm()), asyncio.create_task(to_browser())]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    with contextlib.suppress(Exception):
        await websocket.close()
