# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench replication-lag`: the lag the DR appliance's daemon sustains for many hosts at its
interval, over the shaped WAN link of `bench replication`, and rsync of the same changes as the peer.

The same two appliances and link as `bench replication` (bench/replication.py): a source appliance backs
up N lab hosts; the DR appliance reaches its `serve-replica` through a lab namespace's sshd, with a key
granted nothing else, over `tc tbf` on both ends and a delaying relay for the round-trip time. After the
first copies (timed apart), each cycle changes every host and backs it up at the source just before the
DR daemon's next run, and the DR appliance's real `appliance daemon` replicates the site at its `--every`
interval. The cycle is the product's at a short interval: what scales with the interval is the waiting,
not the transfer. Per cycle: the daemon's replication job from its JSON log (`job.started` to
`job.finished`, one `point.created` per host), the bytes on the site's link meanwhile; every second the
lag per host as `appliance replicas` shows it, read from both appliances' catalogs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

from appliance.bench.capture import KEY_OPTS, _wire
from appliance.bench.replication import _run, shaped
from appliance.domain.models import Point, format_size
from appliance.lab import Lab, LabHost
from appliance.lab.relay import Relay
from appliance.store import catalog
from appliance.store.layout import Home

SAMPLE_EVERY = 1.0  # seconds between two readings of both catalogs
LEAD_MARGIN = 5.0  # seconds between the end of a cycle's backups and the daemon's next run


@dataclass
class Job:
    """One replication job of the DR daemon, as its log and the site's link counters tell it."""

    started: float  # monotonic, when its `job.started` line arrived
    wire_at_start: int
    finished: float | None = None
    wire_at_end: int = 0
    ok: bool = True
    message: str = ""
    points: list[dict[str, object]] = field(default_factory=list)  # its `point.created` events

    @property
    def seconds(self) -> float:
        return (self.finished or self.started) - self.started

    @property
    def wire(self) -> int:
        return self.wire_at_end - self.wire_at_start


@dataclass
class Cycle:
    written: int  # bytes the lab wrote to the hosts' disks
    backups_seconds: float  # changing and backing up every host at the source
    failed_backups: list[str] = field(default_factory=list)


@dataclass
class Row:
    what: str
    seconds: float
    wire: int
    points: int
    written: int = 0


class DaemonLog:
    """Reads the daemon's JSON log as it is written: its replication jobs, with the link's bytes at each edge."""

    def __init__(self, stream: IO[str], site: LabHost) -> None:
        self.site = site
        self.jobs: list[Job] = []
        self.lines: list[str] = []
        self.overlaps = 0  # a job started while another one ran (the daemon must never do that)
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            wire, now = _wire(self.site), time.monotonic()
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self.changed:
                self._take(event, now, wire)
                self.changed.notify_all()

    def _take(self, event: dict[str, object], now: float, wire: int) -> None:
        name, kind = event.get("event"), event.get("kind")
        if name == "job.started" and kind == "replicate":
            if self.jobs and self.jobs[-1].finished is None:
                self.overlaps += 1
            self.jobs.append(Job(now, wire))
        elif name == "job.finished" and kind == "replicate" and self.jobs:
            job = self.jobs[-1]
            job.finished, job.wire_at_end = now, wire
            job.ok, job.message = bool(event.get("ok")), str(event.get("message", ""))
        elif name == "point.created" and event.get("purpose") == "replication" and self.jobs:
            self.jobs[-1].points.append(event)

    def wait(self, condition: object, timeout: float) -> bool:
        """Wait until `condition()` holds (checked at every event), or `timeout` seconds."""
        with self.changed:
            return self.changed.wait_for(condition, timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self._thread.join(timeout=30)


class LagSampler:
    """Every second: each host's lag as `appliance replicas` shows it (its newest point at the source minus
    its newest here), read from both catalogs."""

    def __init__(self, source: Home, dr: Home, hosts: list[str]) -> None:
        self.source, self.dr, self.hosts = source, dr, hosts
        self.samples: list[float] = []  # one per host per reading, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            for host in self.hosts:
                there, here = _newest(self.source, host), _newest(self.dr, host)
                if there is None or here is None:
                    continue
                self.samples.append(max(0.0, (there.created - here.created).total_seconds()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _newest(home: Home, host: str) -> Point | None:
    return catalog.load(home.chain_dir(host), host).newest


def _newest_id(home: Home, host: str) -> str | None:
    newest = _newest(home, host)
    return None if newest is None else newest.id


def run_replication_lag_bench(hosts: int = 10, disk_size: int = 512 << 20, data: float = 0.4, change: float = 0.01,
                              interval: float = 90.0, cycles: int = 5, rate: str = "100mbit",
                              rtt: float = 0.030) -> None:  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-replication-lag-", dir="/var/tmp"))
    lab = Lab(work / "lab")
    source, dr = work / "source", work / "dr"
    src = [sys.executable, "-m", "appliance", "--home", str(source)]
    dst = [sys.executable, "-m", "appliance", "--home", str(dr)]
    names = [f"h{i:02d}" for i in range(1, hosts + 1)]
    relay = None
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        made = {h.name: h for h in lab.up(names, disk_size=disk_size, data_fraction=data)}
        site = next(h for h in lab.up(["site"], disk_size=1 << 20) if h.name == "site")
        for name in names:
            _run([*src, "host", "add", name, "--address", f"root@{made[name].address}", "--disk", made[name].disk,
                  "--key", str(lab.key_file), "--trust-first-use", "--python", "/usr/bin/python3"])  # fmt: skip
            _run([*src, "backup", name])
        dr_key = work / "dr_key"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(dr_key)])
        authorized = Path(site.folder) / "authorized_keys"
        _run([*src, "site", "grant", "dr1", "--key", f"{dr_key}.pub", "--authorized-keys", str(authorized)])
        with authorized.open("a") as f:  # the lab key gets a shell there: rsync's way in
            f.write(lab.key_file.with_suffix(".pub").read_text())
        relay = Relay((site.address, 22), one_way=rtt / 2)
        _run([*dst, "site", "add", "hq", "--address", f"root@127.0.0.1:{relay.port}", "--key", str(dr_key),
              "--trust-first-use"])  # fmt: skip
        _run([*dst, "site", "set", "hq", "--every", f"{interval:.0f}s", "--window", ""])
        with shaped(site, rate):
            t0, w0 = time.monotonic(), _wire(site)
            _run([*dst, "replicate", "hq"])
            seed = Row(f"first copy of {hosts} hosts (by hand)", time.monotonic() - t0, _wire(site) - w0, hosts)
            run = _steady_state(lab, site, names, Home(source), Home(dr), src, dst, change, interval, cycles)
            peers = _peers(work, lab, site, relay, names, src, dst, change)
        load, minutes = (load_before, os.getloadavg()), (time.monotonic() - started) / 60
        _print(seed, run, peers, hosts=hosts, disk_size=disk_size, data=data, change=change, rate=rate, rtt=rtt,
               interval=interval, load=load, minutes=minutes)  # fmt: skip
    finally:
        if relay is not None:
            relay.close()
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class SteadyState:
    cycles: list[Cycle]
    jobs: list[Job]
    lag: list[float]
    delays: list[float]  # per point: published at the DR site minus made at the source, seconds
    overlaps: int
    daemon_rc: int
    daemon_errors: list[str]


def _steady_state(lab: Lab, site: LabHost, names: list[str], source: Home, dr: Home, src: list[str],
                  dst: list[str], change: float, interval: float, cycles: int) -> SteadyState:  # fmt: skip
    """`cycles` intervals of the DR daemon: each host changed and backed up at the source just before each
    of the daemon's runs (the first run is at its start)."""
    night = f"{datetime.now() + timedelta(hours=12):%H:%M}"  # no consolidation during the run
    done: list[Cycle] = [_backups(lab, names, src, change, 0)]
    daemon = subprocess.Popen([*dst, "--log-json", "daemon", "--consolidate-at", night], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert daemon.stderr is not None
    log = DaemonLog(daemon.stderr, site)
    sampler = None
    try:
        for k in range(1, cycles):
            # The daemon's next run is due one interval after its last one started; the backups of this cycle
            # start twice as long before it as the slowest cycle's backups took (the machine is shared, their
            # time varies), and never while the last run still goes on.
            if not log.wait(lambda k=k: len(log.jobs) >= k and log.jobs[k - 1].finished is not None, interval * 3):
                raise RuntimeError(f"the daemon's replication run {k} did not end in {interval * 3:.0f} s")
            if sampler is None:  # the steady state: before the first run ends, the DR site holds the first copies
                sampler = LagSampler(source, dr, names)
            lead = 2 * max(c.backups_seconds for c in done) + LEAD_MARGIN
            time.sleep(max(0.0, log.jobs[k - 1].started + interval - lead - time.monotonic()))
            done.append(_backups(lab, names, src, change, k))
        log.wait(lambda: len(log.jobs) >= cycles and log.jobs[cycles - 1].finished is not None, interval * 3)
        # A host backed up after its run began is pulled by the next one: wait until the DR site holds all.
        deadline = time.monotonic() + interval * 2 + 60
        while time.monotonic() < deadline and any(_newest_id(source, n) != _newest_id(dr, n) for n in names):
            time.sleep(SAMPLE_EVERY)
    finally:
        if sampler is not None:
            sampler.stop()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=300)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    made = {(n, p.id): p.created for n in names for p in catalog.load(source.chain_dir(n), n).points}
    delays = [
        (datetime.fromisoformat(str(e["timestamp"])) - made[(str(e["host"]), str(e["point"]))]).total_seconds()
        for job in log.jobs
        for e in job.points
        if (str(e["host"]), str(e["point"])) in made
    ]
    errors = [line.strip() for line in log.lines if '"level": "error"' in line or "Traceback" in line]
    lag = sampler.samples if sampler else []
    return SteadyState(done, log.jobs, lag, delays, log.overlaps, daemon.returncode or 0, errors)


def _backups(lab: Lab, names: list[str], src: list[str], change: float, cycle: int) -> Cycle:
    """Change every host's disk by `change` of it and take a point of each at the source."""
    t0 = time.monotonic()
    written = sum(lab.change(name, change, seed=1000 * (cycle + 1) + i) for i, name in enumerate(names))
    failed = []
    for name in names:
        try:
            _run([*src, "backup", name])
        except RuntimeError as exc:  # reported, not fatal: the daemon's behaviour is what is measured
            failed.append(f"{name}: {exc}")
    return Cycle(written, time.monotonic() - t0, failed)


def _peers(work: Path, lab: Lab, site: LabHost, relay: Relay, names: list[str], src: list[str],
           dst: list[str], change: float) -> list[Row]:  # fmt: skip
    """One more change of every host, carried over the same link (nothing else on it) by `appliance replicate`
    of the site by hand (what the daemon's job runs) and by rsync of the raw images, one after the other."""
    copies = work / "rsync"
    copies.mkdir()
    for name in names:  # rsync's copies at the DR site start from the state the DR appliance holds
        _run(["cp", "--sparse=always", lab.host(name).disk, str(copies / f"{name}.img")])
    cycle = _backups(lab, names, src, change, 99)
    if cycle.failed_backups:
        raise RuntimeError(f"backups failed at the source: {cycle.failed_backups}")
    t0, w0 = time.monotonic(), _wire(site)
    _run([*dst, "replicate", "hq"])
    rows = [Row(f"appliance replicate, {len(names)} hosts (by hand)", time.monotonic() - t0, _wire(site) - w0,
                len(names), cycle.written)]  # fmt: skip
    ssh = ["ssh", "-p", str(relay.port), "-i", str(lab.key_file), *KEY_OPTS, "-c", "aes128-gcm@openssh.com"]
    t0, w0 = time.monotonic(), _wire(site)
    for name in names:
        _run(["rsync", "--inplace", "--no-whole-file", "--ignore-times", "-e", " ".join(ssh),
              f"root@127.0.0.1:{lab.host(name).disk}", str(copies / f"{name}.img")])  # fmt: skip
    rows.append(Row(f"rsync --inplace, {len(names)} raw images in one loop", time.monotonic() - t0,
                    _wire(site) - w0, len(names), cycle.written))  # fmt: skip
    return rows


def _print(seed: Row, run: SteadyState, peers: list[Row], *, hosts: int, disk_size: int, data: float, change: float,
           rate: str, rtt: float, interval: float, load: tuple[tuple[float, ...], tuple[float, ...]],
           minutes: float) -> None:  # fmt: skip
    link = f"link {rate} (tc tbf) and {rtt * 1000:.0f} ms RTT (a relay)"
    print(f"\nreplication lag: {hosts} hosts of {format_size(disk_size)} ({data:.0%} data), {change:.0%} of each "
          f"changed and backed up at the source every {interval:.0f} s; {link}; the DR daemon's --every "
          f"{interval:.0f}s, {len(run.jobs)} runs")  # fmt: skip
    print(f"load average {load[0][0]:.2f} before, {load[1][0]:.2f} after; {minutes:.1f} minutes in all\n")
    print(f"    {'run':46} {'seconds':>8} {'wire':>11} {'points':>7} {'wire/written':>13}")
    print(f"    {seed.what:46} {seed.seconds:8.1f} {format_size(seed.wire):>11} {seed.points:7}")
    rows = [
        Row(f"daemon run {i + 1}" + ("" if job.ok else " FAILED"), job.seconds, job.wire, len(job.points),
            run.cycles[i].written if i < len(run.cycles) else 0)
        for i, job in enumerate(run.jobs)
    ]  # fmt: skip
    for r in [*rows, *peers]:
        ratio = f"{r.wire / r.written:12.2f}x" if r.written else f"{'-':>13}"
        print(f"    {r.what:46} {r.seconds:8.1f} {format_size(r.wire):>11} {r.points:7} {ratio}")
    full = [r for r in rows if r.points == hosts]
    if not full:
        print("\n    no daemon run pulled every host's point: nothing to project")
        return
    transfer = statistics.mean(r.seconds for r in full)
    worst = max(r.seconds for r in full)
    backups = statistics.mean(c.backups_seconds for c in run.cycles)
    print(f"\n    a daemon run carrying all {hosts} hosts' increments: mean {transfer:.1f} s, max {worst:.1f} s, "
          f"mean {format_size(statistics.mean(r.wire for r in full))} on the wire ({len(full)} runs)")  # fmt: skip
    print(f"    the source's {hosts} backups before each run took {backups:.1f} s (mean)")
    if run.lag:
        print(f"    lag as `appliance replicas` shows it (newest there - newest here), each host every "
              f"{SAMPLE_EVERY:.0f} s from the end of the first run: "
              f"max {max(run.lag):.0f} s, mean {statistics.mean(run.lag):.1f} s ({len(run.lag)} samples)")  # fmt: skip
    if run.delays:
        print(f"    each point from made at the source to published here: max {max(run.delays):.1f} s, "
              f"mean {statistics.mean(run.delays):.1f} s ({len(run.delays)} points)")  # fmt: skip
    at = 15 * 60
    valid = "valid" if worst < at else "NOT valid"
    print(f"    at a 15-minute interval: lag at most 15 min + {worst:.0f} s = {(at + worst) / 60:.1f} min (a point "
          f"made just after a run began waits one interval, then its run); {valid} while a run's {worst:.0f} s stays "
          f"under the interval")  # fmt: skip
    verdict = "never two at once" if not run.overlaps else f"{run.overlaps} started while another ran"
    print(f"    daemon: {len(run.jobs)} replication runs, {sum(not j.ok for j in run.jobs)} failed, {verdict}, "
          f"exit {run.daemon_rc}")  # fmt: skip
    for c in run.cycles:
        for failure in c.failed_backups:
            print(f"    a backup at the source failed: {failure}")
    for line in run.daemon_errors[:10]:
        print(f"    daemon error: {line[:300]}")
