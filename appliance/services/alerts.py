# SPDX-License-Identifier: GPL-2.0-or-later
"""Alerts: the channels people are told through, the check that turns what `status` and the job journal
say into incidents (domain.alerts decides), and the delivery of their messages.

Checking and delivering are apart: `check` only writes messages into the outbox, `deliver` sends what is
due. A mail server that refuses or a webhook that is down costs a log line and a retry later (a minute,
doubling up to an hour; a message still undelivered after MAX_AGE is dropped, logged), never a backup: the
daemon runs both in a watcher thread of their own, beside the scheduler.
"""

from __future__ import annotations

import platform
import secrets
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from appliance.domain import alerts as rules
from appliance.domain.alerts import MAIL, WEBHOOK, Channel, Condition, Incident
from appliance.domain.schedule import REPLICATE
from appliance.errors import AlertError, ApplianceError
from appliance.log import get_logger
from appliance.ports import Notifier, Tools
from appliance.services import status
from appliance.store import alerts as records
from appliance.store import journal, sites
from appliance.store.layout import Home

log = get_logger(__name__)

RETRY_FIRST = timedelta(minutes=1)
RETRY_MAX = timedelta(hours=1)
MAX_AGE = timedelta(days=3)  # an alert this old is news no more: dropped, with a log event
DEFAULT_SMTP_PORT = 25


# Channels


def add_mail(home: Home, *, smtp: str, recipients: list[str], sender: str | None = None, starttls: bool = False,
             user: str = "", password_file: Path | None = None, name: str | None = None) -> Channel:  # fmt: skip
    """:raises AlertError: a bad address, a login without a password file, a password file others may read."""
    host, port = parse_smtp(smtp)
    for address in [*recipients, *([sender] if sender else [])]:
        if "@" not in address or any(c.isspace() for c in address):
            raise AlertError(f"invalid mail address {address!r}")
    if not recipients:
        raise AlertError("a mail channel needs at least one --to address")
    if bool(user) != (password_file is not None):
        raise AlertError("--user and --password-file go together: the server's login needs both")
    password = read_password(password_file) if password_file is not None else ""
    channel = Channel(name=name or _free_name(home, MAIL), kind=MAIL, smtp_host=host, smtp_port=port,
                      starttls=starttls, user=user, sender=sender or f"appliance@{appliance_name()}",
                      recipients=tuple(recipients))  # fmt: skip
    records.save_channel(home, channel, password)
    log.info("alert.channel_added", channel=channel.name, kind=MAIL, server=f"{host}:{port}")
    return channel


def add_webhook(home: Home, *, url: str, name: str | None = None) -> Channel:
    """:raises AlertError: not an http(s) URL."""
    validate_url(url)
    channel = Channel(name=name or _free_name(home, WEBHOOK), kind=WEBHOOK, url_shown=rules.redact_url(url))
    records.save_channel(home, channel, url)
    log.info("alert.channel_added", channel=channel.name, kind=WEBHOOK, url=channel.url_shown)
    return channel


def remove(home: Home, name: str) -> None:
    """:raises AlertError: no such channel. Its messages still waiting are dropped at the next delivery."""
    records.remove_channel(home, name)
    log.info("alert.channel_removed", channel=name)


def channels(home: Home) -> list[Channel]:
    return records.channels(home)


def parse_smtp(text: str) -> tuple[str, int]:
    """HOST, HOST:PORT or [IPv6]:PORT; port 25 when none is given."""
    host, colon, port = text.rpartition(":") if not text.endswith("]") else ("", "", "")
    if not colon or "]" in port:
        host, port = text, str(DEFAULT_SMTP_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AlertError(f"invalid mail server {text!r}: use HOST:PORT, e.g. smtp.example.com:587")
    return host, int(port)


def validate_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise AlertError(f"not an http(s) URL: {rules.redact_url(url)}",
                         hint="a webhook URL starts with https:// (or http://)")  # fmt: skip


def read_password(path: Path) -> str:
    """The SMTP password: the file's first line. Refused when others may read it (it would not be
    root's alone)."""
    try:
        if path.stat().st_mode & 0o077:
            raise AlertError(f"{path} may be read by others than its owner: chmod 600 it first")
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AlertError(f"cannot read the password file {path} ({exc.strerror})") from exc
    if not lines or not lines[0]:
        raise AlertError(f"{path} holds no password on its first line")
    return lines[0]


def _free_name(home: Home, kind: str) -> str:
    taken = {c.name for c in records.channels(home)}
    return next(f"{kind}-{n}" for n in range(1, len(taken) + 2) if f"{kind}-{n}" not in taken)


def appliance_name() -> str:
    """This appliance as messages name it: its host name."""
    return platform.node() or "appliance"


# Checking


@dataclass(frozen=True, slots=True)
class CheckReport:
    notices: list[rules.Notice]
    queued: int  # messages put in the outbox (notices times channels)
    open: list[Incident]


def check(home: Home, tools: Tools, now: datetime | None = None) -> CheckReport:
    """Judge every condition now, update the incidents and queue their messages for every channel."""
    now = now or datetime.now(UTC)
    found, unknown = conditions(home, tools, now)
    with records.locked(home):
        decision = rules.decide(records.incidents(home), found, now, unknown)
        queued = _queue(home, decision.notices, now)
        records.save_incidents(home, decision.incidents)
    for notice in decision.notices:
        log.info("alert.raised" if notice.state != rules.RESOLVED else "alert.resolved", state=notice.state,
                 kind=notice.incident.kind, subject=notice.incident.subject, text=notice.incident.text)  # fmt: skip
    return CheckReport(decision.notices, queued, [i for i in decision.incidents if i.is_open])


def conditions(home: Home, tools: Tools, now: datetime) -> tuple[list[Condition], frozenset[str]]:
    """What is wrong now, and the kinds that could not be judged (their incidents are left as they are)."""
    view = status.overview(home, tools, now, with_vms=False)
    found: list[Condition] = []
    for host in view.hosts:
        found += _host_conditions(host)
    found += rules.store_full(view.store.percent, view.store.days_until_full)
    found += _replication_conditions(home, now)
    unknown: frozenset[str] = frozenset()
    try:
        found += _vm_conditions(status.vm_statuses(home, tools))
    except ApplianceError as exc:  # libvirt down: what the VMs do is unknown, not fine
        log.warning("alert.vms_unknown", error=exc.message)
        unknown = frozenset({rules.VM_STOPPED, rules.FAILBACK_FAILED})
    return found, unknown


def _host_conditions(host: status.HostStatus) -> list[Condition]:
    if host.error:  # the daemon skips a host whose record does not read: it is not being protected
        return [Condition(rules.FAILING, host.name, f"{host.name}: its record does not read: {host.error}")]
    found = [
        rules.late(host.name, host.age_seconds, host.interval, host.late_after),
        rules.failing(host.name, host.failures_in_row, host.last_error),
    ]
    if host.verification == "failed":
        found.append(Condition(rules.VERIFY_FAILED, host.name,
                               f"{host.name}: point {host.newest} failed verification"))  # fmt: skip
    if host.boot is not None and not host.boot.ok:
        found.append(Condition(rules.BOOT_FAILED, host.name,
                               f"{host.name}: point {host.boot.point} did not boot: {host.boot.detail}"))  # fmt: skip
    return [c for c in found if c is not None]


def _vm_conditions(vms: list[status.VmStatus]) -> list[Condition]:
    found = []
    for vm in vms:
        if vm.stopped_unexpectedly:
            found.append(Condition(rules.VM_STOPPED, vm.host,
                                   f"{vm.host}: recovery VM {vm.name} is {vm.state}; its writes are kept, "
                                   f"`appliance failover {vm.host}` resumes it"))  # fmt: skip
        progress = vm.failback
        if progress is not None and (progress.error or progress.phase.startswith("failed")):
            found.append(Condition(rules.FAILBACK_FAILED, vm.host,
                                   f"{vm.host}: failback to {progress.target} failed: {progress.error}"))  # fmt: skip
    return found


def _replication_conditions(home: Home, now: datetime) -> list[Condition]:
    """Each site this appliance replicates from (a DR appliance): judged on its replications in the journal."""
    found = []
    for name in sites.names(home):
        try:
            site = sites.load(home, name)
        except ApplianceError:
            continue  # the daemon logs a site record that does not read
        outcomes = [(e.started, e.ok, e.message) for e in journal.load(home, host=name, kind=REPLICATE)]
        lag = rules.replication_lag(name, site.interval, site.window, outcomes, now)
        if lag is not None:
            found.append(lag)
    return found


def _queue(home: Home, notices: list[rules.Notice], now: datetime) -> int:
    """Each notice's message into the outbox once per channel (called with the alerts' lock held)."""
    targets = records.channels(home)
    if not notices or not targets:
        return 0
    name = appliance_name()
    waiting = records.outbox(home)
    for notice in notices:
        message = rules.message(notice, name)
        waiting += [records.Outgoing(secrets.token_hex(8), c.name, message, now, now) for c in targets]
    records.save_outbox(home, waiting)
    return len(notices) * len(targets)


def open_incidents(home: Home) -> list[Incident]:
    """The incidents open now, oldest first (what the console shows)."""
    return sorted((i for i in records.incidents(home) if i.is_open), key=lambda i: i.opened)


# Delivering


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    sent: int
    failed: dict[str, str]  # channel -> why its message was not delivered this time
    dropped: int
    waiting: int  # still in the outbox


def deliver(home: Home, tools: Tools, now: datetime | None = None, *, retry_now: bool = False) -> DeliveryReport:
    """Send every message that is due, oldest first (`retry_now`: every waiting one, as after a mail server
    was mended). A channel that fails is tried again later (and not again in this round: its other messages
    wait too); never raises for a delivery that failed."""
    now = now or datetime.now(UTC)
    notifier = _notifier(tools)
    sent, dropped, failed = 0, 0, {}
    with records.locked(home):
        known = {c.name: c for c in records.channels(home)}
        waiting = records.outbox(home)
        for item in list(waiting):
            channel = known.get(item.channel)
            if channel is None or now - item.created > MAX_AGE:
                waiting.remove(item)
                dropped += 1
                log.warning("alert.dropped", channel=item.channel, kind=item.message.kind,
                            subject=item.message.subject, attempts=item.attempts,
                            why="channel removed" if channel is None else "undelivered for too long")  # fmt: skip
            elif (retry_now or item.next_try <= now) and item.channel not in failed:
                error = _send(notifier, home, channel, item)
                if error is None:
                    waiting.remove(item)
                    sent += 1
                else:
                    failed[item.channel] = error
                    waiting[waiting.index(item)] = _later(item, error, now)
            else:
                continue
            records.save_outbox(home, waiting)  # after each message: a crash never sends one twice
    return DeliveryReport(sent, failed, dropped, len(waiting))


def _send(notifier: Notifier, home: Home, channel: Channel, item: records.Outgoing) -> str | None:
    """Send one message; None when it went, else why not (logged)."""
    try:
        notifier.send(channel, records.secret(home, channel.name), item.message)
    except AlertError as exc:
        log.error("alert.delivery_failed", channel=channel.name, kind=item.message.kind, state=item.message.state,
                  subject=item.message.subject, attempt=item.attempts + 1, error=exc.message)  # fmt: skip
        return exc.message
    log.info("alert.sent", channel=channel.name, kind=item.message.kind, state=item.message.state,
             subject=item.message.subject, attempts=item.attempts + 1)  # fmt: skip
    return None


def _later(item: records.Outgoing, error: str, now: datetime) -> records.Outgoing:
    """The next try: a minute after the first failure, doubling up to an hour."""
    delay = min(RETRY_FIRST * 2**item.attempts, RETRY_MAX)
    return replace(item, attempts=item.attempts + 1, next_try=now + delay, last_error=error)


def _notifier(tools: Tools) -> Notifier:
    if tools.notifier is None:
        raise AlertError("no way to send alerts was wired here")
    return tools.notifier


@dataclass(frozen=True, slots=True)
class TrialResult:
    channel: str
    error: str  # "" when the message was accepted


def test(home: Home, tools: Tools, now: datetime | None = None) -> list[TrialResult]:
    """One test message to each channel, now (not through the outbox: the user waits for the verdict).

    :raises AlertError: no channel."""
    targets = records.channels(home)
    if not targets:
        raise AlertError("no alert channel", hint="add one with `appliance alert add mail|webhook`")
    notifier = _notifier(tools)
    message = rules.trial_message(appliance_name(), now or datetime.now(UTC))
    results = []
    for channel in targets:
        try:
            notifier.send(channel, records.secret(home, channel.name), message)
            log.info("alert.test_sent", channel=channel.name)
            results.append(TrialResult(channel.name, ""))
        except AlertError as exc:
            log.error("alert.delivery_failed", channel=channel.name, state=rules.TEST, error=exc.message)
            results.append(TrialResult(channel.name, exc.message))
    return results


# The daemon's watcher


class Watcher:
    """Checks and delivers every `every` seconds until stopped, in a thread of the daemon's: a failure
    (a damaged file, a bug) is logged and the next round goes on; the scheduler never waits for it."""

    def __init__(self, home: Home, tools: Tools, every: float = 60.0) -> None:
        self.home, self.tools, self.every = home, tools, every
        self.stop = threading.Event()

    def run(self) -> None:
        log.info("alert.watcher_started", every=self.every)
        while not self.stop.is_set():
            self.once()
            self.stop.wait(self.every)

    def once(self) -> None:
        try:
            check(self.home, self.tools)
        except Exception:  # noqa: BLE001 - the watcher outlives any one round; the next may succeed
            log.exception("alert.check_failed")
        try:
            deliver(self.home, self.tools)
        except Exception:  # noqa: BLE001
            log.exception("alert.deliver_failed")
