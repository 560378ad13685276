# SPDX-License-Identifier: GPL-2.0-or-later
"""The cloud copy: recovery points in an S3 bucket, sealed, locked, and readable without this appliance.

One module per command, so that a command is read, and changed, in one file:

- setup.py: `cloud add` (proves the bucket and its Object Lock, makes the store's key), `cloud attach`
  (a store another appliance made), `cloud key export` and the key as 24 words, the credentials file.
- push.py: `cloud push` (the blocks the bucket lacks, packed and sealed; the manifest last; the locks
  extended).
- points.py: `cloud points` (what the bucket holds, read from the bucket, with each point's lock).
- verify.py: `cloud verify [--deep]`.
- restore.py: `cloud restore --to PATH` and `--to-store`.
- prune.py: `cloud prune` (the bucket's retention on demand).

bucket.py is no command: it holds what they share (a store opened, the bucket's layout and manifests, the
locks, a point located, the retention that push and prune both apply). A command imports it and never
another command; so does services/failover.py (a failover from a bucket) and the nbdkit plugin.

Nothing is re-exported here: importing one command does not import the others (nor their libraries, e.g.
`mnemonic` for setup.py alone). Import the module you need: `from appliance.services.cloud import push`.
"""
