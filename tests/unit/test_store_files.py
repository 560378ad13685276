# SPDX-License-Identifier: GPL-2.0-or-later
"""Small files under APPLIANCE_HOME: typed reads name the file and the field; concurrent atomic writes never
mix; every path of a host refuses a name that is not a host name."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import typer

from appliance.cli import app
from appliance.cli._output import HostOrCommand
from appliance.domain.models import Host
from appliance.domain.recovery import RESERVED_NAMES
from appliance.errors import ChainLockedError, ConfigError, DamagedFileError
from appliance.store.files import read_as, read_json, write_json
from appliance.store.layout import Home
from appliance.store.lock import HostLock


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "it is empty"),
        (b"\xff\xfe", "it is not text"),
        (b"{", "it is not JSON"),
        (b"[]", "it holds an array, not an object"),
        (b'{"name": "web1"}', "field 'address' is missing"),
        (b'{"name": "web1", "address": 5}', "field 'address' holds a number, not a string"),
        (b'{"name": "web1", "address": "a", "user": "root", "port": true}', "field 'port' holds true, not an integer"),
        (b'{"name":"w","address":"a","user":"r","port":22,"key_file":"k","host_key":{"key_type":"t","base64":"b"}}',
         "field 'host_key.fingerprint' is missing"),
    ],
)  # fmt: skip
def test_a_damaged_record_names_its_file_and_what_is_wrong(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "web1.json"
    path.write_bytes(content)
    with pytest.raises(DamagedFileError, match=f"^{path} is damaged: {problem}"):
        read_as(path, Host)


def test_a_folder_where_a_record_should_be_is_named(tmp_path: Path) -> None:
    with pytest.raises(DamagedFileError, match=f"cannot read {tmp_path}"):
        read_json(tmp_path)


def _write_many(path: Path, writer: str) -> None:
    for i in range(100):
        write_json(path, {"writer": writer, "i": i, "body": writer * 50_000})


def test_two_processes_writing_one_record_leave_one_whole_version(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_json(path, {"writer": "", "i": 0, "body": ""})
    writers = [multiprocessing.get_context("fork").Process(target=_write_many, args=(path, w)) for w in "ab"]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        doc = read_json(path)  # a half-written or mixed file would not decode, or would mix bodies
        assert isinstance(doc, dict) and doc["body"] == doc["writer"] * 50_000
    for w in writers:
        w.join()
        assert w.exitcode == 0  # neither writer failed on the other's temporary file
    assert read_json(path)["i"] == 99  # type: ignore[index]
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left


@pytest.mark.parametrize(
    "path_of",
    [Home.host_record, Home.key_file, Home.failback_key_file, Home.chain_dir, Home.failover_dir, Home.screenshots_dir,
     lambda home, name: home.failback_file(name, ".json"), lambda home, name: home.screenshot(name, "p1")],
)  # fmt: skip
@pytest.mark.parametrize("name", ["../hosts/web1", "web1/../../x", "/etc/passwd", ".", ""])
def test_no_path_of_a_host_reaches_outside_its_folder(tmp_path: Path, path_of: object, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid host name"):
        path_of(Home(tmp_path), name)  # type: ignore[operator]


def test_every_word_the_cli_takes_in_place_of_a_host_is_reserved() -> None:
    groups = [g for g in typer.main.get_command(app).commands.values() if isinstance(g, HostOrCommand)]  # type: ignore[attr-defined]
    assert len(groups) >= 2
    assert {name for g in groups for name in g.commands} <= RESERVED_NAMES


def test_a_damaged_lock_file_still_refuses_the_second_job(tmp_path: Path) -> None:
    with HostLock(tmp_path / "lock", "web1", "backup"):
        (tmp_path / "lock").write_text("[]")  # what the holder wrote, replaced by something else
        with pytest.raises(ChainLockedError, match="another job is running"):
            HostLock(tmp_path / "lock", "web1", "verify").__enter__()
