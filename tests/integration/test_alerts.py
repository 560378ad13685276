# SPDX-License-Identifier: GPL-2.0-or-later
"""Alerts through a real mail server (aiosmtpd) and a real HTTP endpoint run by the test: they arrive once,
with the right text, from jobs the scheduler ran on lab hosts; a mail server that refuses costs a retry,
never a backup."""

from __future__ import annotations

import email
import email.message
import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from datetime import time as time_of_day
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from appliance import bootstrap
from appliance.domain.schedule import BACKUP, Job
from appliance.lab.console import free_port
from appliance.services.daemon import Scheduler, SystemClock, run_job
from appliance.store import journal
from appliance.store.layout import Home
from tests.conftest import points_json, run_cli, start_cli


class Inbox:
    """An aiosmtpd handler: keeps every mail it accepts, or refuses each with `refuse` ("421 ...")."""

    def __init__(self) -> None:
        self.mails: list[email.message.Message] = []
        self.refuse = ""
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        if self.refuse:
            return self.refuse
        self.mails.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def about(self, words: str) -> list[email.message.Message]:
        return [m for m in self.mails if words in str(m["Subject"])]


class Hook:
    """An HTTP endpoint: keeps every JSON body POSTed to it, with its path."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, str]]] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/T0/s3cr3tT0ken"

    def about(self, words: str) -> list[dict[str, str]]:
        return [b for _, b in self.bodies if words in b["title"]]


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    handler = Inbox()
    handler.port = free_port()
    server = Controller(handler, hostname="127.0.0.1", port=handler.port)
    server.start()
    yield handler
    server.stop()


@pytest.fixture
def hook() -> Iterator[Hook]:
    found = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            found.bodies.append((self.path, body))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield found
    server.shutdown()
    server.server_close()


def _add_channels(home: Path, inbox: Inbox, hook: Hook) -> None:
    mail = run_cli(home, "alert", "add", "mail", "--smtp", f"127.0.0.1:{inbox.port}", "--to", "it@example.com",
                   "--to", "oncall@example.com", "--from", "backup@example.com")  # fmt: skip
    assert mail.rc == 0 and "added mail-1" in mail.out, mail.err
    added = run_cli(home, "alert", "add", "webhook", "--url", hook.url)
    assert added.rc == 0 and "s3cr3t" not in added.out + added.err, added.out + added.err


def _backup(home: Path, host: str) -> journal.Entry:
    """One backup job as the daemon runs it (recorded in the journal), in this process."""
    h = Home(home)
    tools = bootstrap.tools(h)
    sched = Scheduler(h, lambda job: run_job(h, tools, job), SystemClock(), time_of_day(2, 0))
    sched.run_job(Job(BACKUP, host, datetime.now(UTC)))
    return journal.load(h, host=host)[-1]


def _check(home: Path, *extra: str) -> str:
    done = run_cli(home, "--log-json", "alert", "check", *extra)
    assert done.rc == 0, done.err
    return done.err


def test_alert_test_reaches_the_mail_server_and_the_webhook_once(home: Path, inbox: Inbox, hook: Hook) -> None:
    _add_channels(home, inbox, hook)
    listed = run_cli(home, "alert", "list")
    assert listed.rc == 0 and f"POST http://127.0.0.1:{hook.port}/***" in listed.out and "s3cr3t" not in listed.out
    tested = run_cli(home, "alert", "test")
    assert tested.rc == 0, tested.err
    assert tested.out.splitlines() == ["mail-1: sent", "webhook-1: sent"]
    (mail,) = inbox.mails
    assert mail["To"] == "it@example.com, oncall@example.com" and mail["From"] == "backup@example.com"
    assert "TEST: alerts from this appliance reach you" in mail["Subject"]
    ((path, body),) = hook.bodies
    assert path == "/hooks/T0/s3cr3tT0ken" and body["state"] == "test"
    assert body["text"].startswith(body["title"]) and "TEST: alerts from this appliance reach you" in body["title"]
    inbox.refuse = "550 5.7.1 relaying denied"
    refused = run_cli(home, "alert", "test")
    assert refused.rc == 1 and "mail-1: FAILED: the mail server" in refused.err and "550 5.7.1 relaying denied" in (
        refused.err
    )  # fmt: skip
    assert "webhook-1: sent" in refused.out and len(hook.bodies) == 2


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # a test server on 127.0.0.1
def test_a_mail_server_that_wants_a_login_gets_the_password_files(home: Path, tmp_path: Path) -> None:
    logins: list[tuple[bytes, bytes]] = []

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, auth: Any) -> AuthResult:
        assert isinstance(auth, LoginPassword)
        logins.append((auth.login, auth.password))
        return AuthResult(success=auth.password == b"hunter2")

    handler = Inbox()
    handler.port = free_port()
    server = Controller(handler, hostname="127.0.0.1", port=handler.port, authenticator=authenticate,
                        auth_require_tls=False, auth_required=True)  # fmt: skip
    server.start()
    try:
        password = tmp_path / "password"
        password.write_text("hunter2\n")
        password.chmod(0o600)
        added = run_cli(home, "alert", "add", "mail", "--smtp", f"127.0.0.1:{handler.port}", "--to", "it@example.com",
                        "--user", "backup", "--password-file", str(password))  # fmt: skip
        assert added.rc == 0, added.err
        password.unlink()  # the appliance keeps its own copy (0600)
        tested = run_cli(home, "--log-json", "alert", "test")
        assert tested.rc == 0, tested.err
        assert logins == [(b"backup", b"hunter2")] and len(handler.mails) == 1
        assert "hunter2" not in tested.out + tested.err + (home / "alerts" / "channels.json").read_text()
        assert (home / "alerts" / "mail-1.secret").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()


def test_a_failing_host_is_one_message_on_each_channel_then_resolved_then_late(
    make_host, home: Path, inbox: Inbox, hook: Hook
) -> None:  # type: ignore[no-untyped-def]
    host = make_host(size=8 << 20)
    _add_channels(home, inbox, hook)
    assert run_cli(home, "host", "set", host.name, "--python", "/nonexistent/python3").rc == 0
    assert not _backup(home, host.name).ok
    _check(home)
    assert not hook.about("failing")  # one failure may be a blip: no alert yet
    for _ in range(3):
        assert not _backup(home, host.name).ok
        _check(home)
    failing = f"backups of {host.name} are failing"
    ((mail,), (body,)) = inbox.about(failing), hook.about(failing)
    assert mail["Subject"].startswith("[") and "ALERT: " + failing in mail["Subject"]
    assert f"{host.name}: the last 2 backups failed; the last: " in _text(mail)
    assert body["state"] == "open" and body["kind"] == "failing" and body["subject"] == host.name
    incidents = run_cli(home, "alert", "incidents")
    assert incidents.rc == 0 and f"failing  {host.name}" in incidents.out

    assert run_cli(home, "host", "set", host.name, "--python", "python3").rc == 0
    assert _backup(home, host.name).ok
    _check(home)
    _check(home)
    resolved = f"RESOLVED: {failing}"
    assert len(inbox.about(failing)) == 2 and len(inbox.about(resolved)) == 1 and len(hook.about(resolved)) == 1
    assert host.name not in run_cli(home, "alert", "incidents").out

    # late: a point is due every minute, and the newest is an hour old (aged in its catalog)
    assert run_cli(home, "host", "set", host.name, "--interval", "60s").rc == 0
    _age_newest_point(home, host.name, timedelta(hours=1))
    _check(home)
    _check(home)
    late = f"ALERT: {host.name} is late"
    ((mail,), (body,)) = inbox.about(late), hook.about(late)
    assert f"{host.name}: newest point is 1 h old; a point is due every 1 min" in _text(mail)
    assert body["kind"] == "late" and body["text"].startswith(body["title"])


def test_a_refusing_mail_server_costs_a_retry_never_a_backup(make_host, home: Path, inbox: Inbox, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    good, bad = make_host(size=8 << 20), make_host(size=8 << 20)
    _add_channels(home, inbox, hook)
    inbox.refuse = "421 4.3.2 service not available, try later"
    for name in (good.name, bad.name):
        assert run_cli(home, "host", "set", name, "--interval", "3s").rc == 0
    assert run_cli(home, "host", "set", bad.name, "--python", "/nonexistent/python3").rc == 0
    night = f"{datetime.now() + timedelta(hours=12):%H:%M}"  # no consolidation during the test
    daemon = start_cli(home, "--log-json", "daemon", "--consolidate-at", night, "--alert-every", "1")
    try:
        deadline = time.monotonic() + 60
        failing = f"backups of {bad.name} are failing"
        while time.monotonic() < deadline and not (hook.about(failing) and len(points_json(home, good.name)) >= 2):
            time.sleep(0.5)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert len(points_json(home, good.name)) >= 2  # backed up while the mail server refused
    assert len(hook.about(failing)) == 1 and not inbox.mails  # the webhook told, the mail waits
    failures = [json.loads(x) for x in err.splitlines() if '"alert.delivery_failed"' in x]
    assert failures and failures[0]["channel"] == "mail-1" and "421 4.3.2 service not available" in failures[0]["error"]
    assert len(_outbox(home)) == 1 and _outbox(home)[0]["attempts"] >= 1

    logged = _check(home)  # the next try is not due yet: still refused or not, it waits
    assert not inbox.mails and '"alert.sent"' not in logged
    inbox.refuse = ""
    logged = _check(home, "--retry-now")
    assert '"alert.sent"' in logged and len(inbox.about(failing)) == 1 and _outbox(home) == []
    assert len(hook.about(failing)) == 1  # never sent twice


def test_bad_input_is_one_line(home: Path, tmp_path: Path) -> None:
    cases = [
        (["alert", "add", "webhook", "--url", "ftp://x"], "error: not an http(s) URL: ftp://x"),
        (["alert", "remove", "nosuch"], "error: no alert channel named 'nosuch'"),
        (["alert", "add", "mail", "--smtp", "smtp.example.com:x", "--to", "a@example.com"],
         "error: invalid mail server 'smtp.example.com:x'"),
        (["alert", "test"], "error: no alert channel"),
    ]  # fmt: skip
    password = tmp_path / "password"
    password.write_text("hunter2\n")
    password.chmod(0o644)
    login = ["--user", "u", "--password-file", str(password)]
    cases.append((["alert", "add", "mail", "--smtp", "smtp.example.com:587", "--to", "a@example.com", *login],
                  f"error: {password} may be read by others than its owner"))  # fmt: skip
    for argv, first_line in cases:
        done = run_cli(home, *argv)
        assert done.rc == 70, (argv, done.err)
        assert done.err.splitlines()[0].startswith(first_line) and "Traceback" not in done.err, done.err
        assert "hunter2" not in done.out + done.err
    assert not (home / "alerts" / "mail-1.secret").exists()


def _age_newest_point(home: Path, host: str, by: timedelta) -> None:
    path = home / "store" / host / "chain.json"
    doc = json.loads(path.read_text())
    newest = doc["points"][-1]
    newest["created"] = (datetime.fromisoformat(newest["created"]) - by).isoformat()
    path.write_text(json.dumps(doc))


def _text(mail: email.message.Message) -> str:
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def _outbox(home: Path) -> list[dict[str, Any]]:
    path = home / "alerts" / "outbox.json"
    return list(json.loads(path.read_text())) if path.exists() else []


def test_mail_over_starttls_and_implicit_tls_checks_the_server_s_certificate(tmp_path: Path, home: Path) -> None:
    """The mail server's certificate is checked against the machine's trusted CAs (here the test's own, by
    SSL_CERT_FILE, as OpenSSL reads it): STARTTLS when asked, TLS from the first byte on port 465."""
    import random
    import ssl

    from appliance.adapters.tls import make_self_signed

    smtps = f"127.0.0.{random.randint(2, 250)}"  # port 465 on a loopback address of this test's own
    cert, key = tmp_path / "smtp.pem", tmp_path / "smtp.key"
    make_self_signed(cert, key, smtps)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    starttls, implicit = Inbox(), Inbox()
    starttls.port = free_port()
    servers = [Controller(starttls, hostname="127.0.0.1", port=starttls.port, tls_context=context,
                          require_starttls=True),
               Controller(implicit, hostname=smtps, port=465, ssl_context=context)]  # fmt: skip
    for server in servers:
        server.start()
    try:
        trusted = {"SSL_CERT_FILE": str(cert)}
        for name, server in (("tls1", f"127.0.0.1:{starttls.port}"), ("tls2", f"{smtps}:465")):
            added = run_cli(home, "alert", "add", "mail", "--smtp", server, "--to", "it@example.com", "--name", name,
                            *(["--starttls"] if name == "tls1" else []))  # fmt: skip
            assert added.rc == 0, added.err
        refused = run_cli(home, "alert", "test")  # not trusted yet: the certificate is refused, nothing is sent
        failed = [line for line in refused.err.splitlines() if line.startswith(("tls1: FAILED", "tls2: FAILED"))]
        assert refused.rc == 1 and len(failed) == 2 and all("CERTIFICATE_VERIFY_FAILED" in f for f in failed)
        assert starttls.mails == [] and implicit.mails == []
        sent = run_cli(home, "alert", "test", env=trusted)
        assert sent.rc == 0, sent.err
        assert len(starttls.mails) == 1 and len(implicit.mails) == 1
    finally:
        for server in servers:
            server.stop()
