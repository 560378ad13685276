# SPDX-License-Identifier: GPL-2.0-or-later
"""The web console's API and pages over real TLS (`appliance web` in its own process): who may do what,
sessions, CSRF, bad input, metrics, and the states it shows for a real lab host."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import points_json, run_cli
from tests.integration.console import PASSWORDS, RunningConsole, add_users, console


@pytest.fixture
def web(home: Path):  # type: ignore[no-untyped-def]
    add_users(home)
    with console(home, "--session-timeout", "4s") as running:
        yield running


def test_every_page_and_api_call_needs_a_login(web: RunningConsole) -> None:
    with web.client() as c:
        assert c.get("/").status_code == 303 and c.get("/").headers["location"] == "/login?next=/"
        assert c.get("/jobs").headers["location"] == "/login?next=/jobs"
        for path in ("/api/v1/overview", "/api/v1/hosts", "/api/v1/jobs", "/api/v1/vms", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.json() == {"error": "log in or send an API token (Authorization: Bearer ...)"}
        assert c.post("/api/v1/hosts/web1/backup").status_code == 401
        assert c.get("/api/v1/hosts", headers={"Authorization": "Bearer apl_nope_nope"}).status_code == 401
        assert c.get("/login").status_code == 200 and c.get("/static/console.css").status_code == 200
        headers = c.get("/login").headers  # never framed by another site, no inline script, nothing cached
        assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src 'self';" in headers["content-security-policy"] and headers["cache-control"] == "no-store"


def test_a_wrong_password_gets_a_generic_answer_after_a_delay(web: RunningConsole) -> None:
    with web.client() as c:
        answers = []
        for user, password in (("alice", "not her password"), ("nobody", "whatever it is")):
            t0 = time.monotonic()
            r = c.post("/login", data={"user": user, "password": password})
            answers.append((r.status_code, "wrong user name or password" in r.text, time.monotonic() - t0 >= 1.0))
        assert answers == [(401, True, True), (401, True, True)]  # an unknown name reads as a wrong password


def test_failed_logins_are_rate_limited(web: RunningConsole) -> None:
    with web.client() as c:
        for _ in range(5):
            assert c.post("/login", data={"user": "victor", "password": "a wrong guess!"}).status_code == 401
        r = c.post("/login", data={"user": "victor", "password": PASSWORDS["victor"]})
        assert r.status_code == 429 and "too many failed logins" in r.text


def test_sessions_expire_and_logout_ends_them(web: RunningConsole) -> None:
    c = web.login("victor")
    assert c.get("/api/v1/me").json() == {"user": "victor", "role": "viewer"}
    time.sleep(5)  # --session-timeout 4s
    assert c.get("/api/v1/me").status_code == 401
    assert c.get("/").headers["location"] == "/login?next=/"
    c = web.login("victor")
    assert c.post("/logout").status_code == 303
    assert c.get("/api/v1/me").status_code == 401


def test_roles_are_enforced_on_the_server(web: RunningConsole, make_host, home: Path) -> None:  # type: ignore[no-untyped-def]
    host = make_host(size=16 << 20)
    assert run_cli(home, "backup", host.name).rc == 0
    point = str(points_json(home, host.name)[0]["id"])
    viewer, operator = web.login("victor"), web.login("oscar")
    for path, body in ((f"/api/v1/hosts/{host.name}/failover", {"point": point, "confirm": point}),
                       (f"/api/v1/hosts/{host.name}/backup", None),
                       (f"/api/v1/hosts/{host.name}/verify-boot", {"point": point}),
                       (f"/api/v1/vms/{host.name}/stop", {"keep": True}),
                       (f"/api/v1/failbacks/{host.name}/cutover", None)):  # fmt: skip
        r = viewer.post(path, json=body)
        assert r.status_code == 403 and r.json()["error"] == "victor is a viewer; this needs an operator or more"
    assert viewer.post(f"/hosts/{host.name}/backup").status_code == 403  # the page's button too
    assert "Back up now" not in viewer.get(f"/hosts/{host.name}").text
    token = run_cli(home, "user", "token", "create", "victor").out.strip()
    r = viewer.post(f"/api/v1/hosts/{host.name}/backup", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403  # a token carries its user's role
    r = operator.post(f"/api/v1/hosts/{host.name}/backup")
    assert r.status_code == 202 and r.json()["user"] == "oscar"
    history = _wait_for_job(operator, host.name)
    assert history["ok"] and history["user"] == "oscar" and history["origin"] == "console"
    newest = str(points_json(home, host.name)[-1]["id"])
    assert run_cli(home, "host", "set", host.name, "--keep-last", "1").rc == 0
    assert run_cli(home, "consolidate", host.name).rc == 0  # the first point leaves the chain, not the timeline
    viewer = web.login("victor")  # anew: the jobs and commands above may outlast the fixture's 4 s idle timeout
    merged = viewer.get(f"/api/v1/hosts/{host.name}").json()["merged"]
    assert [(m["point"], m["into"]) for m in merged] == [(point, newest)]
    assert f"<td>{point}</td>" in viewer.get(f"/parts/hosts/{host.name}").text


def _wait_for_job(client, host: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    for _ in range(300):
        jobs = client.get("/api/v1/jobs").json()
        done = [j for j in jobs["history"] if j["host"] == host and j["origin"] == "console"]
        if done and not jobs["running"]:
            return dict(done[0])
        time.sleep(0.2)
    raise AssertionError("the console's job did not finish")


def test_a_form_or_api_post_with_a_session_needs_its_csrf_token(web: RunningConsole) -> None:
    c = web.login("oscar")
    token = c.headers.pop("X-CSRF-Token")
    r = c.post("/api/v1/hosts/web1/backup")
    assert r.status_code == 403 and r.json()["error"] == "missing or wrong CSRF token: reload the page"
    assert c.post("/api/v1/hosts/web1/backup", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert c.post("/logout", data={"csrf": "forged"}).status_code == 403
    r = c.post("/api/v1/hosts/web1/backup", headers={"X-CSRF-Token": token})
    assert (
        r.status_code == 404 and r.json()["error"] == "no protected host named 'web1'"
    )  # past the checks: web1 is unknown


def test_malformed_requests_get_a_400_with_one_line(web: RunningConsole, home: Path) -> None:
    c = web.login("oscar")
    r = c.post("/api/v1/hosts/web1/failover", json={"point": "20260101T000000Z"})
    assert r.status_code == 400 and r.json() == {"error": "malformed request: confirm: Field required"}
    r = c.post("/api/v1/hosts/web1/failover", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed request:") and "\n" not in r.text
    r = c.post("/api/v1/hosts/web1/failover", json={"point": "a", "confirm": "b"})
    assert r.status_code == 400 and r.json() == {"error": "confirm must repeat the point's id"}
    r = c.post("/api/v1/hosts/web1/verify-boot", json={"point": "x" * 100})
    assert r.status_code == 400 and "point" in r.json()["error"]
    assert c.get("/api/v1/hosts/..%2Fhosts").status_code in (400, 404)


def test_tokens_for_scripts_and_nothing_secret_in_the_store_or_logs(web: RunningConsole, home: Path) -> None:
    token = run_cli(home, "user", "token", "create", "victor", "--label", "prometheus").out.strip()
    with web.client(headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.get("/api/v1/me").json() == {"user": "victor", "role": "viewer"}
        assert c.get("/api/openapi.json").json()["paths"]["/api/v1/hosts/{name}/failover"]["post"]
        token_id = token.split("_")[1]
        assert run_cli(home, "user", "token", "revoke", token_id).rc == 0
        assert c.get("/api/v1/me").status_code == 401
    web.login("alice")
    stored = "".join(p.read_text() for p in (home / "web").glob("*.json"))
    logged = web.log.read_text()
    for secret in (*PASSWORDS.values(), token, token.split("_", 2)[2]):
        assert secret not in stored and secret not in logged
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (home / "web").iterdir())


def test_the_overview_api_and_metrics_show_a_late_host(web: RunningConsole, make_host, home: Path) -> None:  # type: ignore[no-untyped-def]
    host = make_host(size=16 << 20)
    assert run_cli(home, "host", "set", host.name, "--interval", "8s").rc == 0
    assert run_cli(home, "backup", host.name).rc == 0
    token = run_cli(home, "user", "token", "create", "victor").out.strip()  # outlives the test's short sessions
    c = web.client(headers={"Authorization": f"Bearer {token}"})
    states = [_host_state(c, host.name)]
    time.sleep(11)  # the interval (8 s) and its grace (a quarter of it) pass without a new point
    states.append(_host_state(c, host.name))
    assert states == ["protected", "late"]
    metrics = c.get("/metrics").text
    assert f'appliance_host_state{{host="{host.name}",state="late"}} 1.0' in metrics
    assert f'appliance_host_rpo_seconds{{host="{host.name}"}} 10.0' in metrics
    assert "appliance_store_used_bytes" in metrics
    detail = c.get(f"/api/v1/hosts/{host.name}").json()
    assert detail["status"]["state"] == "late" and len(detail["points"]) == 1
    shown = run_cli(home, "status")  # the CLI reads the same status service
    assert shown.rc == 0 and f"{host.name}  LATE" in shown.out and "store:" in shown.out
    page = web.login("victor").get("/").text
    assert f'id="host-{host.name}" class="state-late"' in page


def _host_state(client, name: str) -> str:  # type: ignore[no-untyped-def]
    hosts = {h["name"]: h for h in client.get("/api/v1/hosts").json()}
    return str(hosts[name]["state"])


def test_bad_console_options_are_one_line(home: Path) -> None:
    r = run_cli(home, "web", "--listen", "nowhere")
    assert r.rc == 81 and r.error_lines == ["error: invalid listen address 'nowhere': use HOST:PORT, e.g. "
                                            "0.0.0.0:8443 or :8443"]  # fmt: skip
    r = run_cli(home, "web", "--listen", "127.0.0.1:1", "--cert", str(home / "missing.pem"))
    assert r.rc == 81 and "--cert and --key" in r.err
    r = run_cli(home, "user", "add", "Bad Name", "--password-stdin", stdin="long enough password\n")
    assert r.rc == 80 and r.error_lines[0].startswith("error: invalid user name 'Bad Name'")
    r = run_cli(home, "user", "add", "bob", "--role", "root", "--password-stdin", stdin="long enough password\n")
    assert r.rc == 80 and r.error_lines[0] == "error: invalid role 'root': use viewer, operator, admin"
    r = run_cli(home, "user", "add", "bob", "--password-stdin", stdin="short\n")
    assert r.rc == 80 and "too short" in r.err
    assert (
        json.loads((home / "web" / "users.json").read_text() if (home / "web" / "users.json").exists() else "{}") == {}
    )


def test_the_vnc_relay_is_for_operators_and_recovery_vms_only(web: RunningConsole) -> None:
    import ssl

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    trust = ssl.create_default_context(cafile=str(web.cert))
    url = web.url.replace("https://", "wss://") + "/vms/{}/vnc"
    origin = web.url.replace("https://", "")
    for user, host, headers in (
        ("victor", "web1", {}),  # a viewer
        ("oscar", "web1", {}),  # an operator, but web1 has no recovery VM
        ("oscar", "web1", {"Origin": "https://evil.example"}),  # another site's page
        (None, "web1", {}),  # nobody
        ("oscar", "..", {}),  # not a host name
    ):
        cookie = web.login(user).cookies.get("appliance_session") if user else "forged"
        sent = {"Cookie": f"appliance_session={cookie}", "Origin": f"https://{origin}", **headers}
        with pytest.raises(InvalidStatus) as refused:
            connect(url.format(host), ssl=trust, additional_headers=sent)
        assert refused.value.response.status_code == 403, (user, host, headers)


def test_the_daemon_serves_the_console_beside_its_scheduler(home: Path) -> None:
    import signal

    from appliance.lab.console import free_port
    from tests.conftest import start_cli

    add_users(home)
    token = run_cli(home, "user", "token", "create", "victor").out.strip()
    port = free_port()
    daemon = start_cli(home, "daemon", "--web", f"127.0.0.1:{port}", "--alert-every", "0")
    try:
        running = RunningConsole(f"https://127.0.0.1:{port}", home / "web" / "cert.pem", daemon, home / "none")  # type: ignore[arg-type]
        for _ in range(150):
            if running.cert.exists():
                try:
                    jobs = running.client(headers={"Authorization": f"Bearer {token}"}).get("/api/v1/jobs")
                    break
                except Exception:
                    pass
            assert daemon.poll() is None, daemon.communicate()[1]
            time.sleep(0.2)
        assert jobs.status_code == 200 and jobs.json()["scheduled"] == []
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert "daemon.stopped" in err
