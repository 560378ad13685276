#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A stand-in for LVM's `lvm` command, for the reader's snapshot logic on a kernel without device-mapper.

Its volumes live in the JSON file $FAKE_LVM_STATE: {"lvs": [report rows], "calls": [argv...],
"snapshot_device": path, "fail": {"lvcreate": message}}. `lvs` prints LVM's JSON report of them (every
field the reader asks for), `lvcreate --snapshot` adds a row whose device is `snapshot_device` (a loop
device of the test's), `lvremove` removes one. The real thing is exercised in tests/heavy, inside the busy
server, whose kernel has device-mapper.
"""

import json
import os
import sys


def main(argv):
    path = os.environ["FAKE_LVM_STATE"]
    with open(path) as f:
        state = json.load(f)
    state["calls"].append(argv)
    command, args = argv[0], argv[1:]
    failure = state.get("fail", {}).get(command)
    code = 0
    if failure:
        sys.stderr.write(f"  {failure}\n")
        code = 5
    elif command == "lvs":
        names = [a for a in args if "/" in a and not a.startswith("-")]
        rows = [lv for lv in state["lvs"] if not names or f"{lv['vg_name']}/{lv['lv_name']}" in names]
        print(json.dumps({"report": [{"lv": rows}]}))
    elif command == "lvcreate":
        origin = args[-1]
        vg, lv = origin.split("/")
        base = next(row for row in state["lvs"] if row["vg_name"] == vg and row["lv_name"] == lv)
        snap = dict(base, lv_name=args[args.index("--name") + 1], lv_path=state["snapshot_device"],
                    lv_tags=args[args.index("--addtag") + 1], lv_kernel_major="", lv_kernel_minor="",
                    lv_attr="Vwi-a-tz-k" if base["segtype"] == "thin" else "swi-a-s---",
                    snap_percent="0.00")  # fmt: skip
        state["lvs"].append(snap)
    elif command == "lvremove":
        vg, lv = args[-1].split("/")
        state["lvs"] = [row for row in state["lvs"] if (row["vg_name"], row["lv_name"]) != (vg, lv)]
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.rename(path + ".tmp", path)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
