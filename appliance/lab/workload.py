# SPDX-License-Identifier: GPL-2.0-or-later
"""A write-heavy workload whose every piece of data proves itself, and the check of a restored copy.

Standard library only, Python 3.6+: it runs on a lab host or inside a lab server's own disk as a plain
script. `run DIR` keeps writing until killed: sqlite transactions committed with fsync (every row
carries the sha256 of its payload), and files rewritten in place or by write, fsync and rename (every
file starts with the sha256 of the rest). `check DIR` reads such a tree as a restore would find it and
prints one line per problem: a database that sqlite calls malformed, a row or a file whose data is not
what its checksum says. A point that is one moment of the disk has none; a point read while the
workload wrote usually has several (what this project's consistency tests prove).

The longest time one commit or rewrite took (the workload's longest stall: what a freeze costs it)
goes to `--stats FILE`, outside DIR, as JSON, after every operation that beats it.
"""

import argparse
import hashlib
import json
import os
import random
import sqlite3
import sys
import time

FILES = 64
ROWS_KEPT = 2000
PAYLOAD = 8192


def _sum(data):
    return hashlib.sha256(data).hexdigest()


def _file_body(rng):
    data = os.urandom(rng.randint(1, 16) * 4096)
    return _sum(data).encode() + b"\n" + data


class Stalls(object):
    def __init__(self, path):
        self.path = path
        self.longest = 0.0
        self.operations = 0

    def timed(self, started):
        took = time.monotonic() - started
        self.operations += 1
        if took > self.longest:
            self.longest = took
            self.save()

    def save(self):
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"longest_stall": self.longest, "operations": self.operations}, f)
        os.replace(tmp, self.path)


def run(root, stats_path, seed):
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "files"), exist_ok=True)
    db = sqlite3.connect(os.path.join(root, "work.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, payload BLOB, sum TEXT)")
    stalls = Stalls(stats_path)
    stalls.save()
    n = 0
    while True:
        n += 1
        started = time.monotonic()
        payload = os.urandom(rng.randint(1, PAYLOAD))
        db.execute("BEGIN")
        db.execute("INSERT INTO rows (payload, sum) VALUES (?, ?)", (payload, _sum(payload)))
        db.execute("DELETE FROM rows WHERE id <= (SELECT max(id) FROM rows) - ?", (ROWS_KEPT,))
        db.execute("COMMIT")
        stalls.timed(started)
        started = time.monotonic()
        _rewrite(os.path.join(root, "files", "f%03d" % rng.randrange(FILES)), rng, in_place=n % 2 == 0)
        stalls.timed(started)
        if n % 200 == 0:
            stalls.save()


def _rewrite(path, rng, in_place):
    body = _file_body(rng)
    if in_place:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def check(root):
    """One line per problem found in a restored copy of DIR (empty: the tree is whole)."""
    problems = []
    db_path = os.path.join(root, "work.db")
    if os.path.exists(db_path):
        problems += _check_db(db_path)
    folder = os.path.join(root, "files")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".tmp"):
            continue  # a rename that had not happened yet: the previous file is the one that counts
        with open(os.path.join(folder, name), "rb") as f:
            head, _, data = f.read().partition(b"\n")
        if not head and not data:
            continue  # truncated in place, not yet rewritten: an empty file is a state the workload had
        if head.decode(errors="replace") != _sum(data):
            problems.append("files/%s does not match its checksum" % name)
    return problems


def _check_db(path):
    try:
        db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    except sqlite3.DatabaseError as exc:
        return ["work.db: %s" % exc]
    try:
        verdict = db.execute("PRAGMA integrity_check").fetchall()
        if verdict != [("ok",)]:
            return ["work.db: integrity_check: %s" % "; ".join(str(v[0]) for v in verdict[:3])]
        bad = [i for i, payload, s in db.execute("SELECT id, payload, sum FROM rows") if _sum(payload) != s]
        return ["work.db: %d rows do not match their checksum (first: %d)" % (len(bad), bad[0])] if bad else []
    except sqlite3.DatabaseError as exc:
        return ["work.db: %s" % exc]
    finally:
        db.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    r = sub.add_parser("run")
    r.add_argument("root")
    r.add_argument("--stats", default="")
    r.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("check")
    c.add_argument("root")
    args = parser.parse_args()
    if args.command == "run":
        run(args.root, args.stats, args.seed)
    elif args.command == "check":
        problems = check(args.root)
        for p in problems:
            print(p)
        sys.exit(1 if problems else 0)
    else:
        parser.print_help()
        sys.exit(2)


if __name__ == "__main__":
    main()
