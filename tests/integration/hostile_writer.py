# SPDX-License-Identifier: GPL-2.0-or-later
"""A failback writer that misbehaves, to test the appliance's side against: it runs on the target in
place of python3 (`hostile_writer.py MODE -c BOOTSTRAP LENGTH`, through a wrapper that the protected
host's --python setting names), takes the real writer's code and the request like the real writer, then:

  garbage      answers with bytes that are no record at all
  huge-record  announces a JSON record of 4 GiB and keeps sending
  huge-series  answers the request, then sends more block hashes than any disk has when asked for them
  ends-early   answers the request, then exits (status 3) when asked for hashes
  cut          answers the request, then kills its SSH session when asked for hashes (the link breaks)

Standard library only, as the real writer.
"""

import json
import os
import signal
import struct
import sys
from typing import BinaryIO

U32 = struct.Struct("<I")
FLOOD = b"\xff" * (1 << 20)


def record(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return U32.pack(len(body)) + body


def flood(out: BinaryIO) -> None:
    """Up to 64 MiB: as much as an appliance that trusts the announced length would buffer."""
    try:
        for _ in range(64):
            out.write(FLOOD)
    except BrokenPipeError:
        pass


def session_process() -> int:
    """The nearest ancestor that is an sshd: killing it breaks the connection without an exit status."""
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)
        if "sshd" in fields[0]:
            return pid
        pid = int(fields[1].split()[1])
    raise SystemExit("no sshd above the hostile writer")


def main() -> None:
    mode, length = sys.argv[1], int(sys.argv[-1])
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    stdin.read(length)  # the real writer's code
    request = json.loads(stdin.read(U32.unpack(stdin.read(U32.size))[0]))
    if mode == "garbage":
        out.write(b"<html>503 Service Unavailable</html>\n")
    elif mode == "huge-record":
        out.write(b"H" + U32.pack(0xFFFFFFFF))
        flood(out)
    else:
        disks = [{"path": d["path"], "size": d["size"], "kind": "file"} for d in request["disks"]]
        out.write(b"H" + record({"disks": disks}))
        out.flush()
        stdin.read(1 + U32.size)  # H and a disk number: the appliance asks for the target's hashes
        if mode == "huge-series":
            out.write(b"h" + U32.pack(0xFFFFFFFF))
            flood(out)
        elif mode == "ends-early":
            sys.stderr.write("hostile writer: giving up\n")
            sys.exit(3)
        elif mode == "cut":
            os.kill(session_process(), signal.SIGKILL)
    out.flush()
    stdin.read()  # until the appliance hangs up


if __name__ == "__main__":
    main()
