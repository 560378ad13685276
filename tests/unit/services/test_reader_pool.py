# SPDX-License-Identifier: GPL-2.0-or-later
"""The kept readers: one per host, dropped when its session ended or the host's settings changed."""

from __future__ import annotations

from appliance.domain.models import Host, HostKey
from appliance.services.reader_pool import KeptReader, ReaderPool


class _Stream:
    bytes_sent = bytes_received = 0

    def __init__(self) -> None:
        self.aborted = False
        self.done = False
        self.deadline: float | None = 1.0

    def ended(self) -> bool:
        return self.done

    def abort(self) -> None:
        self.aborted = True

    def set_deadline(self, at: float | None) -> None:
        self.deadline = at


def _host(timeout: float = 60.0) -> Host:
    key = HostKey("ssh-ed25519", "AAAA", "SHA256:x")
    return Host("web1", "10.0.0.5", "root", 22, "web1.key", key, ("/dev/sda",), timeout=timeout)


def _kept(host: Host, point: str | None = "p1") -> tuple[KeptReader, _Stream]:
    stream = _Stream()
    return KeptReader(host, stream, token="t1", point_id=point), stream  # type: ignore[arg-type]


def test_a_kept_reader_is_taken_once_and_only_tracks_from_its_own_point() -> None:
    pool = ReaderPool()
    kept, stream = _kept(_host())
    pool.keep(kept)
    assert stream.deadline is None  # idle between points: no job's deadline applies
    taken = pool.take(_host())
    assert taken is kept and pool.take(_host()) is None
    assert kept.tracks_from("p1") == "t1"
    assert kept.tracks_from("p2") is None and kept.tracks_from(None) is None


def test_a_reader_whose_session_ended_or_whose_host_changed_is_dropped() -> None:
    pool = ReaderPool()
    kept, stream = _kept(_host())
    pool.keep(kept)
    assert pool.take(_host(timeout=5.0)) is None and stream.aborted
    kept, stream = _kept(_host())
    pool.keep(kept)
    stream.done = True
    assert pool.take(_host()) is None and stream.aborted


def test_keeping_a_second_reader_of_a_host_closes_the_first_and_close_closes_all() -> None:
    pool = ReaderPool()
    first, first_stream = _kept(_host())
    second, second_stream = _kept(_host())
    pool.keep(first)
    pool.keep(second)
    assert first_stream.aborted and not second_stream.aborted
    pool.close()
    assert second_stream.aborted and pool.take(_host()) is None
