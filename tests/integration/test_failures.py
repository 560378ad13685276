# SPDX-License-Identifier: GPL-2.0-or-later
"""Bad input and hostile hosts: one clear line, a specific exit code, never a traceback, chain untouched."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from appliance.errors import (
    AuthenticationError,
    ChainCorruptError,
    ChainLockedError,
    ConfigError,
    DiskAccessError,
    HostKeyError,
    HostUnreachableError,
    RemoteCommandError,
)
from appliance.lab import Lab
from tests.conftest import Result, points_json, run_cli, start_cli
from tests.integration.helpers import host_add, store_state, wait_for_lock


def _one_clear_line(r: Result, exit_code: int, *needles: str) -> None:
    assert r.rc == exit_code, (r.rc, r.err)
    assert "Traceback" not in r.err
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.err
    for needle in needles:
        assert needle in errors[0], errors[0]


def _add(home: Path, lab: Lab, host, *extra: str) -> Result:  # type: ignore[no-untyped-def]
    return run_cli(home, *host_add(host, lab.key_file, *extra))


def _fingerprint(host) -> str:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(host.host_key_pub)], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]


def test_unknown_host_key_is_never_accepted_silently(make_host, lab: Lab, home: Path) -> None:
    host = make_host(add=False)
    r = _add(home, lab, host)
    _one_clear_line(r, HostKeyError.exit_code, "unknown host key", _fingerprint(host))
    assert run_cli(home, "host", "list").out.count(host.name) == 0
    assert not (home / "keys" / host.name).exists()


def test_pinning_a_given_fingerprint(make_host, lab: Lab, home: Path) -> None:
    host = make_host(add=False)
    wrong = "SHA256:" + "A" * 43
    r = _add(home, lab, host, "--host-key-fingerprint", wrong)
    _one_clear_line(r, HostKeyError.exit_code, wrong, _fingerprint(host))
    r = _add(home, lab, host, "--host-key-fingerprint", _fingerprint(host))
    assert r.rc == 0, r.err
    assert _fingerprint(host) in r.out


def test_changed_host_key_is_refused_naming_both(make_host, lab: Lab, home: Path) -> None:
    host = make_host()
    assert run_cli(home, "backup", host.name).rc == 0
    old = _fingerprint(host)
    before = store_state(home, host.name)
    for f in Path(host.folder).glob("ssh_host_ed25519_key*"):
        f.unlink()
    lab.restart_sshd(host.name)
    new = _fingerprint(host)
    r = run_cli(home, "backup", host.name)
    _one_clear_line(r, HostKeyError.exit_code, "HOST KEY CHANGED", old, new)
    assert store_state(home, host.name) == before
    # Re-pinning is an explicit act, checked against the key the host now has.
    assert run_cli(home, "host", "set", host.name, "--host-key-fingerprint", new).rc == 0
    assert run_cli(home, "backup", host.name).rc == 0


def test_host_files_are_private(make_host, home: Path) -> None:
    host = make_host()
    for path in (home / "hosts" / f"{host.name}.json", home / "keys" / host.name, home / "hosts", home / "keys"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_missing_disk(make_host, lab: Lab, home: Path) -> None:
    host = make_host(add=False)
    r = run_cli(home, *host_add(host, lab.key_file, "--trust-first-use", disk="/dev/nope"))
    _one_clear_line(r, DiskAccessError.exit_code, "/dev/nope does not exist")
    assert _add(home, lab, host, "--trust-first-use").rc == 0
    assert run_cli(home, "backup", host.name).rc == 0
    before = store_state(home, host.name)
    os.rename(host.disk, host.disk + ".away")
    try:
        _one_clear_line(run_cli(home, "backup", host.name), DiskAccessError.exit_code, "does not exist")
        os.chmod(host.folder, 0o700)
        os.symlink("/etc", host.disk)  # a directory is not a disk
        _one_clear_line(run_cli(home, "backup", host.name), DiskAccessError.exit_code, "neither a block device")
        os.unlink(host.disk)
    finally:
        os.rename(host.disk + ".away", host.disk)
    assert store_state(home, host.name) == before


def test_relative_disk_path_and_bad_names_are_config_errors(make_host, lab: Lab, home: Path) -> None:
    host = make_host(add=False)
    r = run_cli(home, *host_add(host, lab.key_file, "--trust-first-use", disk="sda"))
    _one_clear_line(r, ConfigError.exit_code, "absolute path")
    r = run_cli(home, *host_add(host, lab.key_file, "--trust-first-use", name="Bad Name", disk="/dev/sda"))
    _one_clear_line(r, ConfigError.exit_code, "invalid host name")


def test_unreachable_host(make_host, lab: Lab, home: Path) -> None:
    host = make_host()
    subnet = host.address.rsplit(".", 1)[0]
    r = run_cli(
        home,
        "host",
        "add",
        "ghost",
        "--address",
        f"root@{subnet}.1:2",
        "--disk",
        "/dev/sda",
        "--key",
        str(lab.key_file),
        "--trust-first-use",
    )
    _one_clear_line(r, HostUnreachableError.exit_code, "cannot reach", "refused")
    pid = int(host.sshd_pid_file.read_text())
    os.kill(pid, 15)
    time.sleep(0.3)
    _one_clear_line(run_cli(home, "backup", host.name), HostUnreachableError.exit_code, "cannot reach")
    lab.restart_sshd(host.name)
    assert run_cli(home, "backup", host.name).rc == 0


def test_authentication_refused(make_host, lab: Lab, home: Path, tmp_path: Path) -> None:
    host = make_host(add=False)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    r = run_cli(home, *host_add(host, stranger, "--trust-first-use"))
    _one_clear_line(r, AuthenticationError.exit_code, "refused the appliance's key")
    protected = tmp_path / "protected"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(protected)], check=True)
    r = run_cli(home, *host_add(host, protected, "--trust-first-use"))
    _one_clear_line(r, ConfigError.exit_code, "passphrase")


def test_python_missing_on_the_host(make_host, home: Path) -> None:
    host = make_host()
    assert run_cli(home, "host", "set", host.name, "--python", "/opt/no/python3").rc == 0
    _one_clear_line(run_cli(home, "backup", host.name), RemoteCommandError.exit_code, "/opt/no/python3 was not found")
    assert points_json(home, host.name) == []


def test_second_run_for_the_same_host_refuses(make_host, home: Path) -> None:
    host = make_host(size=16 << 20)
    assert run_cli(home, "host", "set", host.name, "--pre-hook", "sleep 3").rc == 0  # holds the lock a while
    first = start_cli(home, "backup", host.name)
    wait_for_lock(home, host.name)
    second = run_cli(home, "backup", host.name)
    _one_clear_line(second, ChainLockedError.exit_code, "busy", "backup (pid")
    assert first.wait(120) == 0, first.stderr.read()  # type: ignore[union-attr]
    assert len(points_json(home, host.name)) == 1


def test_hooks_run_around_the_read_and_after_a_failure(make_host, home: Path) -> None:
    host = make_host()
    marks = Path(host.folder) / "hooks.log"
    pre = f"sh -c 'echo pre >> {marks}'"
    post = f"sh -c 'echo post >> {marks}'"
    assert run_cli(home, "host", "set", host.name, "--pre-hook", pre, "--post-hook", post).rc == 0
    assert run_cli(home, "backup", host.name).rc == 0
    assert marks.read_text().split() == ["pre", "post"]
    os.rename(host.disk, host.disk + ".away")
    try:
        assert run_cli(home, "backup", host.name).rc == DiskAccessError.exit_code
    finally:
        os.rename(host.disk + ".away", host.disk)
    # A disk that cannot be opened ends the run before the hooks: nothing was quiesced, nothing to undo.
    assert marks.read_text().split() == ["pre", "post"]
    # A pre hook that failed froze nothing: the post hook must not thaw what another job may have frozen.
    failing = f"sh -c 'echo pre-failed >> {marks}; exit 1'"
    assert run_cli(home, "host", "set", host.name, "--pre-hook", failing).rc == 0
    r = run_cli(home, "backup", host.name)
    _one_clear_line(r, RemoteCommandError.exit_code, "pre hook exited 1")
    assert run_cli(home, "host", "set", host.name, "--pre-hook", pre).rc == 0
    assert run_cli(home, "backup", host.name).rc == 0
    assert marks.read_text().split() == ["pre", "post", "pre-failed", "pre", "post"]


def test_a_failing_hash_sender_is_named_not_the_silence_it_causes(make_host, home: Path) -> None:
    """The thread that streams the previous hashes fails (its list is short): the reader waits for hashes that
    never come, so the run must stop at once with the sender's error, not after the host's 300 s of silence
    (run_cli's guard of 120 s fails the test then)."""
    host = make_host(size=16 << 20)
    assert run_cli(home, "backup", host.name).rc == 0
    assert run_cli(home, "host", "set", host.name, "--timeout", "300").rc == 0
    hashes = next((home / "store" / host.name).glob("disk0/*.hashes"))
    os.truncate(hashes, 32 * 16)
    before = store_state(home, host.name)
    r = run_cli(home, "backup", host.name, timeout=120)
    _one_clear_line(r, ChainCorruptError.exit_code, "block hash list cannot be read", "has 16 blocks")
    assert "verify" in r.err and store_state(home, host.name) == before


def test_a_terminal_is_asked_about_an_unknown_key(make_host, lab: Lab, home: Path) -> None:
    host = make_host(add=False)
    add = [sys.executable, "-m", "appliance", "--home", str(home), *host_add(host, lab.key_file)]
    for answer, expected_rc in (("n\n", HostKeyError.exit_code), ("y\n", 0)):
        done = subprocess.run(
            ["script", "-qec", shlex.join(add), "/dev/null"],
            input=answer,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert _fingerprint(host) in done.stdout  # shown before the question
        assert done.returncode == expected_rc, done.stdout
    assert f"pinned host key {_fingerprint(host)}" in done.stdout
