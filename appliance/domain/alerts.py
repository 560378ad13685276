# SPDX-License-Identifier: GPL-2.0-or-later
"""When the appliance tells people, and what it says (pure: the clock and the facts are arguments).

A *condition* is something wrong now (a host failing, the store 80 % full), keyed by its kind and its
subject (the host, VM, site or store it is about). An *incident* is a condition followed over time: it
is opened when the condition first appears, reminded of every REMIND_AFTER while it lasts, and resolved
once the condition is gone. Each of these three is one *notice*, rendered as one message per channel.

So the number of messages follows the number of incidents, never the number of checks or failures: a
host whose backups fail a hundred times in a row is one open incident, one message. A condition that
flaps (gone and back again and again) would still give a pair of messages per flap; so an incident is
opened with a message at most once per FLAP_QUIET per kind and subject: a condition back sooner is an
open incident that is told once that quiet time is up, if it still holds (and told of nothing if it is
gone by then: its last "resolved" message is still true).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

from appliance.domain.health import failures_in_row
from appliance.domain.models import HOST_NAME, format_age
from appliance.errors import AlertError

REMIND_AFTER = timedelta(hours=24)
FLAP_QUIET = timedelta(hours=1)

# Kinds of condition
LATE = "late"
FAILING = "failing"
VERIFY_FAILED = "verify-failed"
BOOT_FAILED = "boot-failed"
STORE_80 = "store-80"
STORE_95 = "store-95"
VM_STOPPED = "vm-stopped"
FAILBACK_FAILED = "failback-failed"
DR_LAG = "dr-lag"
KINDS = (LATE, FAILING, VERIFY_FAILED, BOOT_FAILED, STORE_80, STORE_95, VM_STOPPED, FAILBACK_FAILED, DR_LAG)
STORE_THRESHOLDS = ((STORE_80, 80.0), (STORE_95, 95.0))
FAILURES_TO_ALERT = 2  # "a backup fails twice in a row": one failure may be a blip the next run mends

_TITLES = {
    LATE: "{subject} is late",
    FAILING: "backups of {subject} are failing",
    VERIFY_FAILED: "the newest point of {subject} failed verification",
    BOOT_FAILED: "a point of {subject} failed boot verification",
    STORE_80: "the store is over 80 % full",
    STORE_95: "the store is over 95 % full",
    VM_STOPPED: "the recovery VM of {subject} stopped unexpectedly",
    FAILBACK_FAILED: "the failback of {subject} failed",
    DR_LAG: "replication from site {subject} lags",
}

# Notice states
OPEN, REMINDER, RESOLVED, TEST = "open", "reminder", "resolved", "test"


@dataclass(frozen=True, slots=True)
class Condition:
    """Something wrong now. `text`: one line saying what and how bad, for a person."""

    kind: str
    subject: str
    text: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"


@dataclass(frozen=True, slots=True)
class Incident:
    """A condition followed over time (alerts/incidents.json keeps them).

    `told`: when the last message of this incident was queued (None: opened but not told yet, held by
    FLAP_QUIET). `last_opened`: when the newest "open" message of this kind and subject was queued, kept
    across reopenings. `resolved`: set once the condition is gone; such an incident is only a memory of
    `last_opened`, dropped when FLAP_QUIET has passed."""

    kind: str
    subject: str
    text: str
    opened: datetime
    told: datetime | None = None
    last_opened: datetime | None = None
    resolved: datetime | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"

    @property
    def is_open(self) -> bool:
        return self.resolved is None

    @property
    def title(self) -> str:
        return title_of(self.kind, self.subject)


@dataclass(frozen=True, slots=True)
class Notice:
    """One thing to tell: an incident opened, still open, or resolved."""

    state: str  # OPEN | REMINDER | RESOLVED
    incident: Incident
    time: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    incidents: list[Incident]  # the new state: open incidents and resolved ones still remembered
    notices: list[Notice]


def title_of(kind: str, subject: str) -> str:
    return _TITLES.get(kind, kind + " {subject}").format(subject=subject)


def decide(
    incidents: Sequence[Incident],
    conditions: Iterable[Condition],
    now: datetime,
    unknown_kinds: frozenset[str] = frozenset(),
) -> Decision:
    """Which incidents to open, remind of and resolve, given the known ones and the conditions now.

    `unknown_kinds`: kinds that could not be judged this time (libvirt not answering, say); their
    incidents are kept exactly as they are, neither resolved nor reminded of."""
    current = {c.key: c for c in conditions}
    known = {i.key: i for i in incidents}
    kept: list[Incident] = []
    notices: list[Notice] = []
    for key in sorted(known.keys() | current.keys()):
        incident, condition = known.get(key), current.get(key)
        if incident is not None and incident.kind in unknown_kinds:
            kept.append(incident)
            continue
        step = _step(incident, condition, now)
        if step is not None:
            new, notice = step
            kept.append(new)
            if notice is not None:
                notices.append(notice)
    return Decision(kept, notices)


Step = tuple[Incident, Notice | None] | None  # an incident's new state (None: forgotten), what to tell


def _step(incident: Incident | None, condition: Condition | None, now: datetime) -> Step:
    """One kind and subject: its incident now (None: forgotten) and what to tell, if anything."""
    if condition is None:
        return _gone(incident, now) if incident is not None else None
    if incident is None or not incident.is_open:
        last_opened = incident.last_opened if incident is not None else None
        incident = Incident(condition.kind, condition.subject, condition.text, now, last_opened=last_opened)
    incident = replace(incident, text=condition.text)
    if incident.told is None:
        if incident.last_opened is not None and now - incident.last_opened < FLAP_QUIET:
            return incident, None  # back too soon after the last "open": told when the quiet time is up
        opened = replace(incident, told=now, last_opened=now)
        return opened, Notice(OPEN, opened, now)
    if now - incident.told >= REMIND_AFTER:
        reminded = replace(incident, told=now)
        return reminded, Notice(REMINDER, reminded, now)
    return incident, None


def _gone(incident: Incident, now: datetime) -> Step:
    """The condition is gone: resolve an open incident (told only if it was told of), forget an old memory."""
    if incident.is_open:
        resolved = replace(incident, resolved=now)
        return resolved, (Notice(RESOLVED, resolved, now) if incident.told is not None else None)
    if incident.last_opened is None or now - incident.last_opened >= FLAP_QUIET:
        return None
    return incident, None


# The conditions, from the facts status and the journal give


def late(host: str, age_seconds: float | None, interval: float, late_after: float) -> Condition | None:
    """A host that missed its RPO by more than one interval: its newest point is older than the age at
    which it counts as late (`late_after`: interval plus grace) plus one more interval."""
    if not late_after or age_seconds is None or age_seconds <= late_after + interval:
        return None
    return Condition(LATE, host, f"{host}: newest point is {format_age(age_seconds)} old; a point is due "
                                 f"every {format_age(interval)}")  # fmt: skip


def failing(host: str, failures_in_row: int, last_error: str) -> Condition | None:
    if failures_in_row < FAILURES_TO_ALERT:
        return None
    return Condition(FAILING, host, f"{host}: the last {failures_in_row} backups failed; the last: {last_error}")


def store_full(percent: float, days_until_full: float | None) -> list[Condition]:
    """One condition per threshold passed: 80 % and 95 % are two incidents."""
    trend = f", full in {format_age(days_until_full * 86400)} at its rate" if days_until_full is not None else ""
    return [
        Condition(kind, "store", f"the store's file system is {percent:.1f} % full{trend}")
        for kind, threshold in STORE_THRESHOLDS
        if percent >= threshold
    ]


def replication_lag(site: str, interval: float, window: str, outcomes: Sequence[tuple[datetime, bool, str]],
                    now: datetime) -> Condition | None:  # fmt: skip
    """A DR site lags when its last successful replication (oldest first `outcomes`: start, ok, message)
    is older than twice its interval (a day, at least, for a site replicated only inside a window: it may
    rightly wait for the window's next opening), or when its last FAILURES_TO_ALERT replications failed.
    A site not replicated on a schedule (interval 0), or not yet tried, does not lag."""
    if interval <= 0 or not outcomes:
        return None
    failed_in_row = failures_in_row([ok for _, ok, _ in outcomes])
    successes = [start for start, ok, _ in outcomes if ok]
    since = successes[-1] if successes else outcomes[0][0]
    limit = max(2 * interval, 86400.0) if window else 2 * interval
    behind = (now - since).total_seconds()
    if failed_in_row >= FAILURES_TO_ALERT:
        last = outcomes[-1][2]
        return Condition(DR_LAG, site, f"site {site}: the last {failed_in_row} replications failed; the last: {last}")
    if behind > limit:
        what = "last successful replication" if successes else "no successful replication since the first try"
        every = format_age(interval)
        return Condition(DR_LAG, site, f"site {site}: {what} {format_age(behind)} ago; it runs every {every}")
    return None


# Messages


@dataclass(frozen=True, slots=True)
class Message:
    """What every channel sends: a subject line (a mail's subject, a chat message's first line), a body,
    and the fields a webhook's receiver may want to sort on."""

    title: str
    body: str
    state: str  # OPEN | REMINDER | RESOLVED | TEST
    kind: str
    subject: str
    time: datetime
    appliance: str  # this appliance's host name


def message(notice: Notice, appliance: str) -> Message:
    incident, state = notice.incident, notice.state
    since = f"{incident.opened:%Y-%m-%d %H:%M} UTC"
    if state == OPEN:
        title, tail = f"ALERT: {incident.title}", f"Open since {since}. A reminder follows daily while it lasts."
    elif state == REMINDER:
        title = f"STILL: {incident.title}"
        tail = f"Open since {since} ({format_age((notice.time - incident.opened).total_seconds())})."
    else:
        title = f"RESOLVED: {incident.title}"
        tail = f"It lasted {format_age((notice.time - incident.opened).total_seconds())} (since {since})."
    body = f"{incident.text}\n{tail}\nAppliance: {appliance}\n"
    return Message(f"[{appliance}] {title}", body, state, incident.kind, incident.subject, notice.time, appliance)


def trial_message(appliance: str, now: datetime) -> Message:
    return Message(f"[{appliance}] TEST: alerts from this appliance reach you",
                   f"A test message, sent by `appliance alert test` at {now:%Y-%m-%d %H:%M:%S} UTC.\n"
                   f"Appliance: {appliance}\n", TEST, "test", "", now, appliance)  # fmt: skip


# Channels


MAIL, WEBHOOK = "mail", "webhook"


@dataclass(frozen=True, slots=True)
class Channel:
    """Where messages go: a mail server and its recipients, or a webhook. The secret of each (the SMTP
    password; the webhook's URL, which carries its token in the path) is never part of this record."""

    name: str
    kind: str  # MAIL | WEBHOOK
    smtp_host: str = ""
    smtp_port: int = 0
    starttls: bool = False
    user: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()
    url_shown: str = ""  # the webhook's URL with its path and query redacted

    @property
    def implicit_tls(self) -> bool:
        """Port 465 speaks TLS from its first byte (SMTPS); others start plain (and STARTTLS if asked)."""
        return self.kind == MAIL and self.smtp_port == 465

    def describe(self) -> str:
        if self.kind == WEBHOOK:
            return f"POST {self.url_shown}"
        tls = " TLS" if self.implicit_tls else " STARTTLS" if self.starttls else ""
        login = f" as {self.user}" if self.user else ""
        return f"smtp {self.smtp_host}:{self.smtp_port}{tls}{login} to {', '.join(self.recipients)}"


def redact_url(url: str) -> str:
    """A webhook URL as it may be shown: scheme and host, the path and query replaced (Slack, Teams and
    most chat hooks carry their token there), and no user or password."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]  # host[:port], without a user or password
    hidden = "/***" if parts.path.strip("/") or parts.query else ""
    return urlunsplit((parts.scheme, netloc, hidden, "", ""))


def validate_channel_name(name: str) -> str:
    """A channel's name becomes the name of its secret's file: never a path."""
    if not HOST_NAME.match(name):
        raise AlertError(f"invalid channel name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
                         "starting with a letter or digit")  # fmt: skip
    return name
