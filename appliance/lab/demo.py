# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance lab demo`: the main job, end to end, on a lab host; each step is the real CLI command.

The lab host's disk is the lab guest, a small Linux that prints its marker when it boots. Each backup
is taken after a new marker is written, so the failover proves which point it booted; then a
consolidation thins the chain to the two newest points. Offsite, a second appliance (its own
APPLIANCE_HOME, the DR site) reaches this one only over SSH, through the sshd of a lab namespace that
plays the source site, with a key this one granted (before the first backup) nothing but
`serve-replica`; it pulls the points, verifies them and boots the newest there, showing its marker.
Then the points go to an S3 bucket with Object Lock (the lab's SeaweedFS), and a third appliance, on
"a new machine" with only the key file and the bucket's credentials, boots the newest one from the
bucket. Last, the VM fails back to a repaired server (another lab host, blank) and that disk boots
with what the VM wrote. A run tears down the one before (VMs, hosts, the DR and new homes, key and
grant, the bucket, namespaces).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from appliance.errors import LabError
from appliance.lab import Lab, LabHost

HOST = "lab1"
REPAIRED = "repaired"
SOURCE_SITE = "hq"  # the lab host whose sshd the DR site reaches this appliance through
DR_SITE = "dr1"
BOOT_CHECK = "console:APPLIANCE-GUEST-UP"
CLOUD = "b2"  # the cloud store: the lab's SeaweedFS stands in for Backblaze B2, Wasabi or AWS S3


def _step(shown: list[str], argv: list[str], stdin: str | None = None) -> str:
    """Print `shown` as the user would type it, run `argv` (`stdin` piped to it), print its output (without
    info logs)."""
    print(f"\n$ {shlex.join(shown)}", flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, input=stdin if stdin is not None else "", stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)  # fmt: skip
    print("\n".join(line for line in done.stdout.splitlines() if "[info     ]" not in line), flush=True)
    if done.returncode != 0:
        raise LabError(f"demo step failed (exit {done.returncode}): {shlex.join(shown)}")
    print(f"  [{time.monotonic() - started:.1f} s]", flush=True)
    return done.stdout


def _cli(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "appliance", "--home", str(home), *args]


def _appliance(home: Path, *args: str) -> str:
    """A step on this appliance (the source site)."""
    return _step(["appliance", *args], _cli(home, *args))


def _at_dr(dr_home: Path, *args: str) -> str:
    """A step on the DR appliance: its own home, shown."""
    return _step(["appliance", "--home", str(dr_home), *args], _cli(dr_home, *args))


def _quiet(home: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(_cli(home, *args), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabError(f"demo step failed (exit {done.returncode}): appliance {shlex.join(args)}")
    return done.stdout


def _dr_home(home: Path) -> Path:
    return home / "lab" / "dr-home"


def _dr_key(home: Path) -> Path:
    return home / "lab" / f"{DR_SITE}_key"


def _new_home(home: Path) -> Path:
    """The appliance on a new machine after the office and the DR site are lost: nothing but the cloud."""
    return home / "lab" / "new-home"


def run_demo(home: Path) -> None:
    lab = Lab(home / "lab")
    _tear_down(home, lab)
    h = _protect(home, lab)
    _grant_dr_site(home, lab)
    _backups(home)
    _first_failover(home)
    _consolidation(home)
    _offsite(home, lab)
    _cloud(home, lab)
    _console(home)
    _failback(home, lab, h.disk)
    print(f"\nDemo complete. The lab host is still up: try `appliance --home {home} failover {HOST}`; "
          f"`appliance --home {home} lab down` removes it.", flush=True)  # fmt: skip


def _tear_down(home: Path, lab: Lab) -> None:
    """The earlier demo's recovery VMs (the DR site's first: both are named after the host), hosts, DR
    home and key, and lab namespaces."""
    print("Tearing down any earlier demo ...", flush=True)
    dr_home, dr_key = _dr_home(home), _dr_key(home)
    if (dr_home / "hosts" / f"{HOST}.json").exists():
        _quiet(dr_home, "failover", "stop", HOST, check=False)
    shutil.rmtree(dr_home, ignore_errors=True)
    if (_new_home(home) / "hosts" / f"{HOST}.json").exists():
        _quiet(_new_home(home), "failover", "stop", HOST, check=False)
    shutil.rmtree(_new_home(home), ignore_errors=True)
    if (home / "cloud" / CLOUD).exists():
        _quiet(home, "cloud", "remove", CLOUD, check=False)
    shutil.rmtree(home / "lab" / "s3", ignore_errors=True)
    dr_key.unlink(missing_ok=True)
    dr_key.with_name(f"{dr_key.name}.pub").unlink(missing_ok=True)
    if (home / "hosts" / f"{HOST}.json").exists():
        _quiet(home, "failover", "stop", HOST, check=False)
        _appliance(home, "host", "remove", HOST, "--purge")
    lab.down()


def _protect(home: Path, lab: Lab) -> LabHost:
    _appliance(home, "lab", "up", "--host", HOST, "--disk-size", "1G")
    h = lab.host(HOST)
    _appliance(home, "host", "add", HOST, "--address", f"root@{h.address}", "--disk", h.disk,
               "--key", str(lab.key_file), "--trust-first-use")  # fmt: skip
    _appliance(home, "host", "set", HOST, "--boot-check", BOOT_CHECK, "--vm-memory", "512")
    return h


def _backups(home: Path) -> None:
    _appliance(home, "lab", "change", HOST, "--percent", "10", "--marker", "monday")
    _appliance(home, "backup", HOST)
    _appliance(home, "lab", "change", HOST, "--percent", "1", "--marker", "tuesday", "--seed", "2")
    _appliance(home, "backup", HOST)
    _appliance(home, "points", HOST)
    _appliance(home, "verify", HOST)


def _first_failover(home: Path) -> None:
    first = json.loads(_quiet(home, "points", HOST, "--json"))[0]["id"]
    print("\nThe server dies. Boot Monday's point, the older one, as a VM:", flush=True)
    _appliance(home, "failover", HOST, "--point", first)
    _appliance(home, "failover", "status")
    _appliance(home, "failover", "stop", HOST)


def _consolidation(home: Path) -> None:
    print("\nNightly consolidation: keep the two newest points; Monday's is merged into Tuesday's.", flush=True)
    autorun = "echo written-during-failover > /root/marker.txt; sync"
    _appliance(
        home, "lab", "change", HOST, "--percent", "1", "--marker", "wednesday", "--seed", "3", "--autorun", autorun
    )
    _appliance(home, "backup", HOST)
    _appliance(home, "host", "set", HOST, "--keep-last", "2")
    _appliance(home, "consolidate", HOST, "--dry-run")
    _appliance(home, "consolidate", HOST)
    _appliance(home, "points", HOST)
    _appliance(home, "verify", HOST)


def _grant_dr_site(home: Path, lab: Lab) -> None:
    """Before the backups: from the grant on, the source keeps the hash lists of every point the DR site
    may still ask for, so each point can be sent as the blocks it lacks."""
    dr_key = _dr_key(home)
    print(f"\nA DR site (a second appliance, its own home {_dr_home(home)}) will pull this appliance's points "
          f"over SSH,\nthrough the sshd of lab host {SOURCE_SITE}, a namespace that plays this site.",
          flush=True)  # fmt: skip
    _appliance(home, "lab", "up", "--host", SOURCE_SITE, "--blank", "--data", "0", "--disk-size", "1M")
    print("\nOn the DR site, a key for the source site:", flush=True)
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", DR_SITE, "-f", str(dr_key)]
    _step(keygen, keygen)
    dr_key.chmod(0o600)
    print("\nOn the source: that key may run only `serve-replica` (list and read points).", flush=True)
    authorized = Path(lab.host(SOURCE_SITE).folder) / "authorized_keys"
    _appliance(home, "site", "grant", DR_SITE, "--key", f"{dr_key}.pub", "--authorized-keys", str(authorized))


def _offsite(home: Path, lab: Lab) -> None:
    """The DR site pulls the points over SSH with the granted key, checks them and boots the newest.

    Both appliances run on this machine and name a recovery VM after its host, so the DR site's VM is
    stopped before the source fails over again."""
    dr_home, site = _dr_home(home), lab.host(SOURCE_SITE)
    print("\nOffsite, on the DR site: add the source site, pull every point, check them.", flush=True)
    _at_dr(dr_home, "site", "add", SOURCE_SITE, "--address", f"root@{site.address}", "--key", str(_dr_key(home)),
           "--trust-first-use")  # fmt: skip
    _at_dr(dr_home, "replicate", SOURCE_SITE)
    _at_dr(dr_home, "replicas")
    _at_dr(dr_home, "points", HOST)
    _at_dr(dr_home, "verify", HOST)
    print("\nThe server room burns. Boot the newest replicated point (Wednesday's) at the DR site:", flush=True)
    _at_dr(dr_home, "failover", HOST)
    _at_dr(dr_home, "failover", "stop", HOST)


def _cloud(home: Path, lab: Lab) -> None:
    """Push to an S3 bucket with Object Lock, then, on a new machine with only the key file and the
    bucket's credentials, boot the newest point straight from the bucket."""
    from appliance.lab.objectstore import start_object_store

    print("\nThe cloud copy: a bucket with Object Lock (the lab's S3 server, SeaweedFS, stands in for B2 or AWS).",
          flush=True)  # fmt: skip
    store = start_object_store(lab, home / "lab" / "s3", name="s3")
    try:
        store.create_bucket("acme-dr", lock=True)
        creds = store.appliance.write(home / "lab" / f"{CLOUD}.creds")
        _appliance(home, "cloud", "add", CLOUD, "--endpoint", store.endpoint, "--bucket", "acme-dr",
                   "--credentials-file", str(creds), "--lock-days", "1")  # fmt: skip
        _appliance(home, "cloud", "push", CLOUD)
        _appliance(home, "cloud", "points", CLOUD)
        key = home / "lab" / f"{CLOUD}.key"
        key.touch(mode=0o600)
        key.write_text(_quiet(home, "cloud", "key", "export", CLOUD))
        print(f"\n$ appliance cloud key export {CLOUD} > {key}   (keep it away from the appliance)", flush=True)
        print("\nThe office and the DR site are lost. A new machine, the key file and the bucket's credentials:",
              flush=True)  # fmt: skip
        new = _new_home(home)
        new.mkdir(parents=True, exist_ok=True)
        _at_dr(new, "cloud", "attach", "--key-file", str(key), "--credentials-file", str(creds))
        _at_dr(new, "cloud", "verify", CLOUD, "--deep")
        _at_dr(new, "failover", HOST, "--from", CLOUD)
        _at_dr(new, "failover", "stop", HOST)
    finally:
        store.stop()


def _console(home: Path) -> None:
    """The web console and its API: a user, a token for scripts, the hosts' states and the metrics."""
    from appliance.lab.console import ask_console, free_port

    print("\nThe web console (pages, /api/v1, /metrics): a user, a token for a script, what it says of the host.",
          flush=True)  # fmt: skip
    (home / "web" / "users.json").unlink(missing_ok=True)
    (home / "web" / "tokens.json").unlink(missing_ok=True)
    _step(
        ["appliance", "user", "add", "admin", "--role", "admin", "--password-stdin"],
        _cli(home, "user", "add", "admin", "--role", "admin", "--password-stdin"),
        stdin="demo admin passphrase\n",
    )
    token = _quiet(home, "user", "token", "create", "admin", "--label", "demo").strip()
    print("\n$ appliance user token create admin --label demo    (printed once; only its hash is kept)", flush=True)
    port = free_port()
    ask_console(_cli(home, "web", "--listen", f"127.0.0.1:{port}"), home, token, port, ["/api/v1/hosts", "/metrics"])


def _failback(home: Path, lab: Lab, disk: str) -> None:
    print("\nThe server dies again; its VM runs and writes (its marker becomes written-during-failover).", flush=True)
    _appliance(home, "failover", HOST)
    print("\nThe server is repaired (a blank disk): fail back while the VM runs, then cut over.", flush=True)
    _appliance(home, "lab", "up", "--host", REPAIRED, "--blank", "--data", "0", "--disk-size", "1G")
    r = lab.host(REPAIRED)
    _appliance(home, "failback", HOST, "--to", f"root@{r.address}", "--disk", f"{disk}={r.disk}", "--trust-first-use")
    _appliance(home, "failback", "status", HOST)
    _appliance(home, "lab", "boot", REPAIRED)
    _appliance(home, "points", HOST)
