# SPDX-License-Identifier: GPL-2.0-or-later
"""Heavy-run fixtures: the integration tests' lab (hosts in network namespaces) and a Ceph RGW in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.lab import Lab
from appliance.lab.ceph import CephStore, remove_state, start_ceph
from tests.integration.conftest import _RUN, guest_image, lab, make_host  # noqa: F401 - fixtures used here


@pytest.fixture(scope="session")
def ceph_store(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephStore]:  # noqa: F811
    """A one-node Ceph cluster with radosgw (appliance/lab/ceph.py) in a lab namespace, started once per run."""
    folder = tmp_path_factory.mktemp("ceph")
    store = start_ceph(lab, folder, name=f"ceph{_RUN}")
    yield store
    store.stop()
    remove_state(folder)  # the OSD's file: a sparse 16 GiB holding what the tests wrote
