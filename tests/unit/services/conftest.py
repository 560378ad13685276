# SPDX-License-Identifier: GPL-2.0-or-later
"""Use cases against fakes of the ports and a real store on tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.services.helpers import Lab


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab.create(tmp_path)
