# SPDX-License-Identifier: GPL-2.0-or-later
"""A stand-in for the appliance's reader that breaks the wire format on purpose: a compromised host.

Tests only; standard library only, as it runs "on the host". A test sets a wrapper as the host's
interpreter (`host set NAME --python WRAPPER`), so the appliance runs `WRAPPER -c BOOTSTRAP N` over SSH
exactly as it runs the real reader, and sends the reader's code and its request on stdin. The wrapper
runs `python3 hostile_reader.py MODE_FILE -c BOOTSTRAP N`; this script reads the code and the request,
then answers as the mode named in MODE_FILE says (see MODES).
"""

import json
import os
import struct
import sys
import time

U32 = struct.Struct("<I")
DATA = struct.Struct("<cQI")
ZERO = struct.Struct("<cQI")
END = struct.Struct("<cQ")
FLOOD = 512 << 20  # what follows a record claiming 4 GiB: far more than the appliance may ever buffer
TRICKLE_EVERY = 2.0  # seconds between the bytes of a trickle: below the host's timeout, never silent


def _read(stream, n):
    data = stream.read(n)
    if len(data) != n:
        sys.exit(0)
    return data


def _json(tag, obj):
    body = json.dumps(obj).encode()
    return tag + U32.pack(len(body)) + body


def _hello(request, size=None):
    disks = [{"path": d["path"], "size": size or os.path.getsize(d["path"]), "kind": "file"} for d in request["disks"]]
    return _json(b"H", {"protocol": 2, "python": "hostile", "disks": disks})


def _block(first, block_size):
    return DATA.pack(b"D", first, block_size) + b"\x11" * 32 + b"\xab" * block_size


def _flood(out):
    piece = bytes(1 << 20)
    for _ in range(FLOOD // len(piece)):
        out.write(piece)


def _trickle(out):
    while True:
        out.write(b"\xab")
        out.flush()
        time.sleep(TRICKLE_EVERY)


def garbage(out, request, block_size):
    out.write(b"Welcome to web1! Last login: yesterday\n" + _hello(request))


def huge_json(out, request, block_size):
    out.write(b"H" + U32.pack(0xFFFFFFFF))
    _flood(out)


def huge_data(out, request, block_size):
    out.write(_hello(request) + DATA.pack(b"D", 0, 0xFFFFFFFF))
    _flood(out)


def block_past_end(out, request, block_size):
    out.write(_hello(request) + _block(1 << 40, block_size))


def huge_count(out, request, block_size):
    out.write(_hello(request) + ZERO.pack(b"Z", 0, 0xFFFFFFFF))


def zero_past_end(out, request, block_size):
    blocks = -(-os.path.getsize(request["disks"][0]["path"]) // block_size)
    out.write(_hello(request) + ZERO.pack(b"Z", blocks - 1, 2))


def step_back(out, request, block_size):
    out.write(_hello(request) + _block(3, block_size) + _block(2, block_size))


def lying(out, request, block_size):
    """Well-formed records whose data is not what their hash says: the point must not be published."""
    size = os.path.getsize(request["disks"][0]["path"])
    out.write(_hello(request) + _block(0, block_size) + END.pack(b"E", size) + bytes(32))


def huge_disk(out, request, block_size):
    out.write(_hello(request, size=100 << 40))


def trickle(out, request, block_size):
    out.write(_hello(request) + DATA.pack(b"D", 0, block_size))
    out.flush()
    _trickle(out)


MODES = {f.__name__.replace("_", "-"): f for f in (garbage, huge_json, huge_data, block_past_end, huge_count,
                                                     zero_past_end, step_back, lying, huge_disk, trickle)}  # fmt: skip


def main():
    with open(sys.argv[1]) as f:
        mode = MODES[f.read().strip()]
    stdin = sys.stdin.buffer
    _read(stdin, int(sys.argv[-1]))  # the reader's code: not run
    request = json.loads(_read(stdin, U32.unpack(_read(stdin, U32.size))[0]).decode())
    out = sys.stdout.buffer
    try:
        mode(out, request, int(request["disks"][0]["block_size"]))
        out.flush()
        while stdin.read(1 << 16):  # stay connected until the appliance hangs up
            pass
    except BrokenPipeError:  # the appliance hung up: what it should do
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
