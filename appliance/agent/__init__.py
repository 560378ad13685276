# SPDX-License-Identifier: GPL-2.0-or-later
"""Code that runs on a protected host. Standard library only: it is shipped over SSH for every run."""

from pathlib import Path


def reader_source() -> bytes:
    """The reader's source, exactly as it is sent to the host."""
    return (Path(__file__).with_name("reader.py")).read_bytes()


def writer_source() -> bytes:
    """The failback writer's source, exactly as it is sent to the target."""
    return (Path(__file__).with_name("writer.py")).read_bytes()
