# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance daemon` and `appliance schedule`: the scheduler and what it will do next."""

from __future__ import annotations

import signal
import sys
import threading
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from appliance.cli._output import table
from appliance.cli.context import state
from appliance.domain.schedule import ALL_HOSTS, parse_time_of_day
from appliance.services.daemon import Scheduler, SystemClock, run_job
from appliance.services.failover import restart_interrupted
from appliance.store import schedule as schedule_store

_AT = typer.Option("--consolidate-at", help="Local time of the nightly consolidation, HH:MM")


def register(app: typer.Typer) -> None:
    app.command("daemon")(daemon)
    app.command("schedule")(schedule)


def daemon(
    ctx: typer.Context,
    consolidate_at: Annotated[str, _AT] = "02:00",
    systemd_unit: Annotated[bool, typer.Option("--systemd-unit", help="Print a systemd unit for it and exit")] = False,
) -> None:
    """Run the scheduler in the foreground until SIGTERM (logs to stderr; JSON with --log-json)."""
    if systemd_unit:
        unit = resources.files("appliance").joinpath("data/appliance.service").read_text()
        typer.echo(unit.replace("@APPLIANCE@", str(Path(sys.argv[0]).resolve())), nl=False)
        return
    st = state(ctx)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()  # honoured between jobs: the one running finishes

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    tools = st.tools
    # First what a power cut or reboot of the appliance stopped: the recovery VMs that were running.
    restart_interrupted(st.home, tools, say=lambda text: typer.echo(text, err=True))
    Scheduler(st.home, lambda job: run_job(st.home, tools, job), SystemClock(), parse_time_of_day(consolidate_at),
              stop).run()  # fmt: skip


def schedule(ctx: typer.Context, consolidate_at: Annotated[str, _AT] = "02:00") -> None:
    """What runs next and when, and what last ran with its outcome."""
    st = state(ctx)
    sched = Scheduler(st.home, lambda job: "", SystemClock(), parse_time_of_day(consolidate_at), threading.Event())
    last = schedule_store.load(st.home)
    rows = []
    for job in sched.next_jobs():
        o = last.get(job.key)
        outcome = (
            "-"
            if o is None
            else f"{o.started.astimezone():%Y-%m-%d %H:%M:%S} {'ok' if o.ok else 'FAILED'}: {o.message}"
        )
        host = "all hosts" if job.host == ALL_HOSTS else job.host
        rows.append([job.kind, host, f"{job.due.astimezone():%Y-%m-%d %H:%M:%S}", outcome])
    typer.echo(table(["JOB", "HOST", "NEXT", "LAST RUN"], rows))
