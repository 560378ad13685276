# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance daemon` and `appliance schedule`: the scheduler and what it will do next."""

from __future__ import annotations

import signal
import sys
import threading
from datetime import datetime
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from appliance.cli._output import raise_unreadable, table
from appliance.cli.context import state
from appliance.domain.schedule import parse_time_of_day, ran_in_the_future
from appliance.errors import DamagedFileError
from appliance.services.alerts import Watcher
from appliance.services.daemon import DEFAULT_JOBS, Scheduler, SystemClock, run_job, upcoming
from appliance.services.failover import restart_interrupted
from appliance.services.reader_pool import ReaderPool
from appliance.store import schedule as schedule_store

if TYPE_CHECKING:
    import uvicorn

_AT = typer.Option("--consolidate-at", help="Local time of the nightly consolidation, HH:MM")


def register(app: typer.Typer) -> None:
    app.command("daemon")(daemon)
    app.command("schedule")(schedule)


def daemon(
    ctx: typer.Context,
    consolidate_at: Annotated[str, _AT] = "02:00",
    jobs: Annotated[int, typer.Option("--jobs", min=1, max=64, help="Jobs of different hosts at once")] = DEFAULT_JOBS,
    systemd_unit: Annotated[bool, typer.Option("--systemd-unit", help="Print a systemd unit for it and exit")] = False,
    alert_every: Annotated[
        float, typer.Option("--alert-every", min=0.0, help="Seconds between alert checks and deliveries; 0: none")
    ] = 60.0,
    web: Annotated[
        str | None, typer.Option("--web", help="Serve the web console too, on HOST:PORT (e.g. :8443)")
    ] = None,
    web_cert: Annotated[Path | None, typer.Option("--web-cert", help="The console's TLS certificate (PEM)")] = None,
    web_key: Annotated[Path | None, typer.Option("--web-key", help="Its private key (PEM)")] = None,
) -> None:
    """Run the scheduler in the foreground until SIGTERM (logs to stderr; JSON with --log-json)."""
    if systemd_unit:
        unit = resources.files("appliance").joinpath("data/appliance.service").read_text()
        typer.echo(unit.replace("@APPLIANCE@", str(Path(sys.argv[0]).resolve())), nl=False)
        return
    st = state(ctx)
    tools = st.tools
    at = parse_time_of_day(consolidate_at)
    readers = ReaderPool()  # each host's reader stays between its points: incrementals read only what was written
    sched = Scheduler(st.home, lambda job: run_job(st.home, tools, job, readers), SystemClock(), at, jobs=jobs)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        sched.request_stop()  # the running jobs finish; none is started after this

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, request_stop)
    # First what a power cut or reboot of the appliance stopped: the recovery VMs that were running.
    restart_interrupted(st.home, tools, say=lambda text: typer.echo(text, err=True))
    # The scheduler runs in its own thread and this one only waits: a signal handler runs here, never inside
    # the scheduler's own waiting on its events (setting an event whose lock the interrupted code holds
    # would deadlock).
    console = _start_console(ctx, web, web_cert, web_key, consolidate_at, sched) if web else None
    runner = threading.Thread(target=sched.run, name="scheduler")
    runner.start()
    # Alerts in a thread of their own: a mail server that hangs for its timeout never holds a backup.
    watcher = Watcher(st.home, tools, every=alert_every)
    if alert_every > 0:
        threading.Thread(target=watcher.run, name="alerts", daemon=True).start()
    try:
        runner.join()
    finally:
        watcher.stop.set()
        if console is not None:
            console.should_exit = True
        readers.close()


def _start_console(ctx: typer.Context, listen: str, cert: Path | None, key: Path | None, consolidate_at: str,
                   sched: Scheduler) -> uvicorn.Server:  # fmt: skip
    """The web console in a thread of the daemon, showing the scheduler's running jobs too."""
    from appliance.cli.web import prepare
    from appliance.web.server import serve_in_thread

    server = prepare(ctx, listen, cert, key, consolidate_at, "30m", scheduled=lambda: sched.running)
    serve_in_thread(server)
    return server


def schedule(ctx: typer.Context, consolidate_at: Annotated[str, _AT] = "02:00") -> None:
    """What runs next and when, and what last ran with its outcome."""
    st = state(ctx)
    now = SystemClock().now()
    last = schedule_store.load(st.home)
    plan = upcoming(st.home, last, now, parse_time_of_day(consolidate_at))
    rows = [[job.kind, job.host, _when(job.due), _outcome(last.get(job.key), now)] for job in plan.jobs]
    rows += [["-", name, "-", f"UNREADABLE: {why}"] for name, why in sorted(plan.unreadable.items())]
    typer.echo(table(["JOB", "HOST", "NEXT", "LAST RUN"], rows))
    raise_unreadable({name: DamagedFileError(why) for name, why in plan.unreadable.items()})


def _when(moment: datetime) -> str:
    return f"{moment.astimezone():%Y-%m-%d %H:%M:%S}"


def _outcome(o: schedule_store.Outcome | None, now: datetime) -> str:
    if o is None:
        return "-"
    later = " (later than now: the clock was changed)" if ran_in_the_future(o.started, now) else ""
    return f"{_when(o.started)}{later} {'ok' if o.ok else 'FAILED'}: {o.message}"
