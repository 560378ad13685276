# SPDX-License-Identifier: GPL-2.0-or-later
"""The appliance's side of the failback writer's wire format against what a hostile target can send:
every length is checked before it is read, so a lie is a ProtocolError, never a big allocation."""

from __future__ import annotations

import json

import pytest

from appliance.agent import wire
from appliance.transfer.protocol import ProtocolError
from appliance.transfer.target import TargetError, TargetSession

BS = 65536
DISK = ("/dev/sda", 10 * BS + 100, BS)  # 11 blocks, the last one short


class _Canned:
    """A stream that answers with fixed bytes (the target's side) and keeps what it is sent."""

    def __init__(self, answer: bytes) -> None:
        self.answer, self.sent = answer, b""
        self.bytes_sent = self.bytes_received = 0

    def write(self, data: bytes | memoryview) -> None:
        self.sent += bytes(data)

    def recv_some(self) -> bytes:
        answer, self.answer = self.answer, b""
        return answer


def _json(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return wire.U32.pack(len(body)) + body


HELLO = b"H" + _json({"disks": [{"path": DISK[0], "size": DISK[1], "kind": "block"}]})


def _session(answer: bytes) -> TargetSession:
    return TargetSession(_Canned(answer))  # type: ignore[arg-type]


def _hashes(count: int) -> bytes:
    return b"h" + wire.U32.pack(count) + bytes(count * wire.PREFIX_LEN)


def test_an_honest_target_is_understood() -> None:
    session = _session(HELLO + _hashes(4) + _hashes(7) + b"e" + b"r" + wire.WRITER_RUN.pack(9, 2) + bytes(32) + b"e")
    assert session.open([DISK])[0]["size"] == DISK[1]
    assert sum(len(chunk) for chunk in session.hash_prefixes(0)) == 11 * wire.PREFIX_LEN
    assert [first for first, _ in session.read_back(0)] == [9]


@pytest.mark.parametrize(
    "answer,says",
    [
        (b"H" + wire.U32.pack(0xFFFFFFFF), "a record of 4294967295 bytes"),
        (b"H" + wire.U32.pack(5) + b"{nope", "not JSON"),
        (b"H" + _json([1, 2]), "not an object"),
        (b"H" + _json({"disks": []}), "does not describe the 1 disks"),
        (b"H" + _json({"disks": [{"path": DISK[0], "size": "big"}]}), "does not describe the 1 disks"),
        (b"Q", "expected b'H' from the target, got b'Q'"),
    ],
)
def test_a_bad_answer_to_the_request_is_a_protocol_error(answer: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says.replace("(", r"\(").replace("[", r"\[")):
        _session(answer).open([DISK])


@pytest.mark.parametrize(
    "series,says",
    [
        (b"h" + wire.U32.pack(0xFFFFFFFF), "4294967295 hashes after 0"),  # no body: refused before reading it
        (_hashes(11) + _hashes(1), "1 hashes after 11"),
        (_hashes(10) + b"e", "hashes of 10 blocks for a disk of 11"),
        (b"r", "unexpected b'r' in a series of b'h' records"),
    ],
)
def test_a_series_of_hashes_never_covers_more_or_less_than_the_disk(series: bytes, says: str) -> None:
    session = _session(HELLO + series)
    session.open([DISK])
    with pytest.raises(ProtocolError, match=says):
        list(session.hash_prefixes(0))


def test_a_read_back_never_reaches_past_the_disk() -> None:
    session = _session(HELLO + b"r" + wire.WRITER_RUN.pack(10, 2) + bytes(32))
    session.open([DISK])
    with pytest.raises(ProtocolError, match="2 blocks from block 10 of a disk of 11"):
        list(session.read_back(0))


def test_the_writers_own_failure_is_a_target_error() -> None:
    with pytest.raises(TargetError, match="write failed") as failure:
        _session(b"X" + _json({"code": "io-error", "message": "write failed: No space left"})).open([DISK])
    assert failure.value.code == "io-error"
