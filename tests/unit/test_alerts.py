# SPDX-License-Identifier: GPL-2.0-or-later
"""Alerts without a network: when an incident opens, is reminded of and resolves (domain.alerts), the
messages' text, what a channel's listing shows of its secret, and the outbox's retries (services.alerts
with a notifier that refuses when told to)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.adapters.webhook import payload
from appliance.domain import alerts as rules
from appliance.domain.alerts import FAILING, OPEN, REMINDER, RESOLVED, Channel, Condition, Incident, Message, Notice
from appliance.errors import AlertDeliveryError, AlertError
from appliance.ports import Tools
from appliance.services import alerts
from appliance.store import alerts as records
from appliance.store.layout import Home
from tests.fakes import FakeHypervisor, FakeImages, LocalShell

T0 = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)
WEB1_FAILING = Condition(FAILING, "web1", "web1: the last 2 backups failed; the last: connection refused")


def run(steps: list[tuple[datetime, list[Condition]]]) -> list[tuple[timedelta, str]]:
    """Feed the decision each check's conditions in turn; every notice, as (time since T0, state)."""
    incidents: list[Incident] = []
    told = []
    for now, conditions in steps:
        decision = rules.decide(incidents, conditions, now)
        incidents = decision.incidents
        told += [(n.time - T0, n.state) for n in decision.notices]
    return told


def minutes(n: int) -> list[datetime]:
    return [T0 + timedelta(minutes=i) for i in range(n)]


def test_a_hundred_failures_of_one_host_are_one_message_then_one_resolved() -> None:
    steps = [(t, [WEB1_FAILING]) for t in minutes(100)] + [(T0 + timedelta(minutes=100), [])]
    steps += [(T0 + timedelta(minutes=101 + i), []) for i in range(5)]  # and nothing more after it
    assert run(steps) == [(timedelta(0), OPEN), (timedelta(minutes=100), RESOLVED)]


def test_a_lasting_incident_is_reminded_of_daily_and_resolved_once() -> None:
    checks = [T0 + timedelta(minutes=10 * i) for i in range(6 * 50)]  # every 10 min for 50 h
    told = run([(t, [WEB1_FAILING]) for t in checks] + [(T0 + timedelta(hours=50), [])] * 3)
    assert told == [(timedelta(0), OPEN), (timedelta(hours=24), REMINDER), (timedelta(hours=48), REMINDER),
                    (timedelta(hours=50), RESOLVED)]  # fmt: skip


def test_a_flapping_condition_is_told_at_most_once_an_hour() -> None:
    # there one minute, gone the next, for three hours: without the quiet time, 180 messages
    steps = [(t, [WEB1_FAILING] if i % 2 == 0 else []) for i, t in enumerate(minutes(180))]
    told = run(steps)
    assert told == [(timedelta(minutes=m), s) for h in range(3) for m, s in ((60 * h, OPEN), (60 * h + 1, RESOLVED))]


def test_a_condition_back_too_soon_is_told_when_the_quiet_time_is_up_if_it_still_holds() -> None:
    steps = [(T0, [WEB1_FAILING]), (T0 + timedelta(minutes=1), [])]
    steps += [(t, [WEB1_FAILING]) for t in minutes(90)[2:]]  # back at minute 2, and it stays
    assert run(steps) == [(timedelta(0), OPEN), (timedelta(minutes=1), RESOLVED), (timedelta(minutes=60), OPEN)]


def test_two_subjects_and_two_kinds_are_separate_incidents() -> None:
    db1 = Condition(FAILING, "db1", "db1: ...")
    store = rules.store_full(96.0, None)
    decision = rules.decide([], [WEB1_FAILING, db1, *store], T0)
    assert sorted((n.incident.kind, n.incident.subject) for n in decision.notices) == [
        (FAILING, "db1"), (FAILING, "web1"), (rules.STORE_80, "store"), (rules.STORE_95, "store")]  # fmt: skip


def test_incidents_of_a_kind_that_could_not_be_judged_are_kept_as_they_are() -> None:
    vm = Condition(rules.VM_STOPPED, "web1", "web1: recovery VM stopped")
    opened = rules.decide([], [vm], T0).incidents
    later = rules.decide(opened, [], T0 + timedelta(days=2), unknown_kinds=frozenset({rules.VM_STOPPED}))
    assert later.notices == [] and later.incidents == opened  # neither resolved nor reminded of


def test_the_conditions_thresholds() -> None:
    assert rules.late("web1", 3600 + 900 + 3600, 3600, 3600 + 900) is None  # exactly one interval past late
    late = rules.late("web1", 3600 + 900 + 3601, 3600, 3600 + 900)
    assert late is not None and late.text == "web1: newest point is 2 h 15 min old; a point is due every 1 h"
    assert rules.late("web1", 10**9, 0, 0) is None  # no interval: never late
    assert rules.failing("web1", 1, "x") is None and rules.failing("web1", 2, "x") is not None
    assert [c.kind for c in rules.store_full(79.9, None)] == []
    assert [c.kind for c in rules.store_full(80.0, 12.5)] == [rules.STORE_80]
    (eighty,) = rules.store_full(80.0, 12.5)
    assert eighty.text == "the store's file system is 80.0 % full, full in 12 d 12 h at its rate"


def test_a_dr_site_lags_past_twice_its_interval_or_after_two_failures() -> None:
    ok, bad = (T0, True, "ok"), (T0 + timedelta(minutes=30), False, "site unreachable")
    now = T0 + timedelta(hours=2)
    assert rules.replication_lag("hq", 3600, "", [ok], now) is None  # exactly twice the interval
    assert rules.replication_lag("hq", 3600, "", [ok], now + timedelta(seconds=1)) is not None
    assert rules.replication_lag("hq", 3600, "01:00-05:00", [ok], now + timedelta(hours=3)) is None  # waits a day
    two = rules.replication_lag("hq", 3600, "", [ok, bad, bad], T0 + timedelta(minutes=31))
    assert two is not None and two.text == "site hq: the last 2 replications failed; the last: site unreachable"
    assert rules.replication_lag("hq", 3600, "", [ok, bad], T0 + timedelta(minutes=31)) is None
    assert rules.replication_lag("hq", 0, "", [bad, bad], now) is None  # not scheduled
    assert rules.replication_lag("hq", 3600, "", [], now) is None  # never tried


def test_the_messages_say_what_when_and_where() -> None:
    incident = Incident(FAILING, "web1", WEB1_FAILING.text, T0)
    opened = rules.message(Notice(OPEN, incident, T0), "backup01")
    assert opened.title == "[backup01] ALERT: backups of web1 are failing"
    assert opened.body == (f"{WEB1_FAILING.text}\nOpen since 2026-11-24 14:00 UTC. A reminder follows daily while "
                           "it lasts.\nAppliance: backup01\n")  # fmt: skip
    reminder = rules.message(Notice(REMINDER, incident, T0 + timedelta(days=1, hours=2)), "backup01")
    assert reminder.title == "[backup01] STILL: backups of web1 are failing"
    assert "Open since 2026-11-24 14:00 UTC (1 d 2 h)." in reminder.body
    resolved = rules.message(Notice(RESOLVED, incident, T0 + timedelta(minutes=95)), "backup01")
    assert resolved.title == "[backup01] RESOLVED: backups of web1 are failing"
    assert "It lasted 1 h 35 min (since 2026-11-24 14:00 UTC)." in resolved.body
    body = payload(opened)
    assert body["text"].startswith("[backup01] ALERT: backups of web1 are failing\nweb1: the last 2 backups")
    assert {k: body[k] for k in ("state", "kind", "subject", "appliance")} == {
        "state": "open", "kind": "failing", "subject": "web1", "appliance": "backup01"}  # fmt: skip


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T000/B000/s3cr3tT0ken", "https://hooks.slack.com/***"),
        ("https://user:pw@chat.example.com:8448/_matrix/hook/abc?token=s3cr3t", "https://chat.example.com:8448/***"),
        ("http://10.0.0.9", "http://10.0.0.9"),
    ],
)
def test_a_webhooks_url_is_shown_without_its_secret(url: str, shown: str) -> None:
    assert rules.redact_url(url) == shown


# The service, with a notifier that refuses on demand


@dataclass
class FakeNotifier:
    refuse: str = ""  # a channel name: its sends fail
    sent: list[tuple[str, Message]] = field(default_factory=list)

    def send(self, channel: Channel, secret: str, message: Message) -> None:
        if channel.name == self.refuse:
            raise AlertDeliveryError("the mail server 127.0.0.1:25 refused: 421 try later")
        self.sent.append((channel.name, message))


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Home, Tools, FakeNotifier, list[Condition]]:
    home = Home(tmp_path / "home").ensure()
    notifier = FakeNotifier()
    tools = Tools(remote=LocalShell(), images=FakeImages(), hypervisor=FakeHypervisor(), notifier=notifier)
    now_wrong: list[Condition] = []
    monkeypatch.setattr(alerts, "conditions", lambda home, tools, now: (list(now_wrong), frozenset()))
    alerts.add_webhook(home, url="https://chat.example.com/hooks/s3cr3t")
    alerts.add_mail(home, smtp="127.0.0.1", recipients=["it@example.com"])
    return home, tools, notifier, now_wrong


def test_a_refused_message_is_retried_with_backoff_and_never_raises(setup: tuple) -> None:  # type: ignore[type-arg]
    home, tools, notifier, now_wrong = setup
    notifier.refuse = "mail-1"
    now_wrong.append(WEB1_FAILING)
    assert alerts.check(home, tools, T0).queued == 2
    report = alerts.deliver(home, tools, T0)
    assert (report.sent, report.waiting, list(report.failed)) == (1, 1, ["mail-1"])
    for minute, attempts in ((0.5, 1), (1, 2), (2.5, 2), (3, 3), (7, 4)):  # next tries at 1, 3, 7 min
        alerts.check(home, tools, T0 + timedelta(minutes=minute))  # the failure goes on: nothing more queued
        alerts.deliver(home, tools, T0 + timedelta(minutes=minute))
        assert [o.attempts for o in records.outbox(home)] == [attempts]
    notifier.refuse = ""
    alerts.deliver(home, tools, T0 + timedelta(minutes=15))
    assert records.outbox(home) == []
    assert [(c, m.state) for c, m in notifier.sent] == [("webhook-1", OPEN), ("mail-1", OPEN)]


def test_the_backoff_stops_doubling_at_an_hour_and_a_message_is_dropped_after_three_days(setup: tuple) -> None:  # type: ignore[type-arg]
    home, tools, notifier, now_wrong = setup
    notifier.refuse = "mail-1"
    now_wrong.append(WEB1_FAILING)
    alerts.check(home, tools, T0)
    moment = T0
    for _ in range(20):
        alerts.deliver(home, tools, moment)
        waiting = records.outbox(home)
        moment = waiting[0].next_try
    assert waiting[0].next_try - T0 < timedelta(days=1) and moment - waiting[0].next_try == timedelta(0)
    gaps = [min(timedelta(minutes=2**n), timedelta(hours=1)) for n in range(20)]
    assert waiting[0].next_try == T0 + sum(gaps, timedelta(0))
    report = alerts.deliver(home, tools, T0 + timedelta(days=3, seconds=1))
    assert (report.dropped, records.outbox(home)) == (1, [])


def test_a_removed_channels_waiting_messages_are_dropped(setup: tuple) -> None:  # type: ignore[type-arg]
    home, tools, notifier, now_wrong = setup
    now_wrong.append(WEB1_FAILING)
    alerts.check(home, tools, T0)
    alerts.remove(home, "mail-1")
    report = alerts.deliver(home, tools, T0)
    assert (report.sent, report.dropped) == (1, 1)
    assert not (home.alerts_dir / "mail-1.secret").exists()


def test_channels_keep_their_secret_in_a_file_of_its_own(setup: tuple) -> None:  # type: ignore[type-arg]
    home, *_ = setup
    listing = (home.alerts_dir / "channels.json").read_text()
    assert "s3cr3t" not in listing and "https://chat.example.com/***" in listing
    secret = home.alerts_dir / "webhook-1.secret"
    assert secret.read_text() == "https://chat.example.com/hooks/s3cr3t" and secret.stat().st_mode & 0o777 == 0o600
    assert home.alerts_dir.stat().st_mode & 0o777 == 0o700
    with pytest.raises(AlertError, match="exists"):
        alerts.add_webhook(home, url="https://x.example.com/h", name="webhook-1")
    assert alerts.add_webhook(home, url="https://x.example.com/h").name == "webhook-2"


@pytest.mark.parametrize("url", ["ftp://x", "x", "https://", "file:///etc/passwd", "https://h:99999/x"])
def test_a_webhook_must_be_http(tmp_path: Path, url: str) -> None:
    with pytest.raises(AlertError, match="not an http"):
        alerts.add_webhook(Home(tmp_path).ensure(), url=url)


def test_smtp_addresses() -> None:
    assert alerts.parse_smtp("smtp.example.com:587") == ("smtp.example.com", 587)
    assert alerts.parse_smtp("smtp.example.com") == ("smtp.example.com", 25)
    assert alerts.parse_smtp("[::1]:2525") == ("::1", 2525)
    for bad in ("smtp:x", ":25", "h:0", "h:70000"):
        with pytest.raises(AlertError, match="invalid mail server"):
            alerts.parse_smtp(bad)
