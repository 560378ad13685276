# SPDX-License-Identifier: GPL-2.0-or-later
"""/metrics in the Prometheus text format (prometheus_client), read from the status service at each scrape.

It needs a viewer's token or session like every other route (Prometheus: `authorization: credentials_file`).
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.domain.health import STATES
from appliance.ports import Tools
from appliance.services import status
from appliance.store import journal
from appliance.store.layout import Home
from appliance.web.deps import Viewer, console_of

router = APIRouter(include_in_schema=False)


class ApplianceCollector(Collector):
    def __init__(self, home: Home, tools: Tools) -> None:
        self._home, self._tools = home, tools

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        view = status.overview(self._home, self._tools)
        yield from _host_metrics(view.hosts)
        yield GaugeMetricFamily("appliance_store_used_bytes", "Bytes used on the store's file system",
                                value=view.store.used)  # fmt: skip
        yield GaugeMetricFamily("appliance_store_size_bytes", "Size of the store's file system", value=view.store.total)
        vms = GaugeMetricFamily("appliance_recovery_vm_running", "1 if the host's recovery VM runs", labels=["host"])
        for vm in view.vms:
            if vm.purpose == "failover":
                vms.add_metric([vm.host], 1.0 if vm.state == "running" else 0.0)
        yield vms
        jobs = CounterMetricFamily("appliance_jobs", "Jobs finished, by kind and outcome", labels=["kind", "outcome"])
        for kind, outcomes in sorted(journal.totals(self._home).items()):
            for outcome, count in sorted(outcomes.items()):
                jobs.add_metric([kind, outcome], float(count))
        yield jobs


def _host_metrics(hosts: list[status.HostStatus]) -> Iterator[GaugeMetricFamily]:
    age = GaugeMetricFamily("appliance_host_newest_point_age_seconds", "Age of the host's newest point",
                            labels=["host"])  # fmt: skip
    rpo = GaugeMetricFamily("appliance_host_rpo_seconds", "Age past which the host counts as late (interval and "
                            "grace; absent: no interval)", labels=["host"])  # fmt: skip
    state = GaugeMetricFamily("appliance_host_state", "1 for the host's state", labels=["host", "state"])
    took = GaugeMetricFamily("appliance_host_last_backup_seconds", "How long the newest point took", labels=["host"])
    changed = GaugeMetricFamily("appliance_host_last_backup_changed_bytes", "Bytes the newest point changed",
                                labels=["host"])  # fmt: skip
    failures = GaugeMetricFamily("appliance_host_backup_failures_in_row", "Backups failed since the last good one",
                                 labels=["host"])  # fmt: skip
    verified = GaugeMetricFamily("appliance_host_verified", "The newest point's verification: 1 ok, 0 failed, "
                                 "-1 not verified yet", labels=["host"])  # fmt: skip
    booted = GaugeMetricFamily("appliance_host_boot_verified", "The newest boot verification: 1 booted, 0 failed",
                               labels=["host"])  # fmt: skip
    for h in hosts:
        if h.age_seconds is not None:
            age.add_metric([h.name], h.age_seconds)
        if h.late_after:
            rpo.add_metric([h.name], h.late_after)
        for s in STATES:
            state.add_metric([h.name, s], 1.0 if h.state == s else 0.0)
        took.add_metric([h.name], h.last_backup_seconds)
        changed.add_metric([h.name], float(h.last_backup_bytes))
        failures.add_metric([h.name], float(h.failures_in_row))
        verified.add_metric([h.name], {"ok": 1.0, "failed": 0.0}.get(h.verification, -1.0))
        if h.boot is not None:
            booted.add_metric([h.name], 1.0 if h.boot.ok else 0.0)
    yield from (age, rpo, state, took, changed, failures, verified, booted)


@router.get("/metrics")
def metrics(request: Request, who: Viewer) -> Response:
    c = console_of(request)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApplianceCollector(c.home, c.tools))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
