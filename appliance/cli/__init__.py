# SPDX-License-Identifier: GPL-2.0-or-later
"""The `appliance` command: thin typer handlers over the use cases, and the one error boundary.

Every expected failure is an ApplianceError: it becomes one line on stderr (and a hint) and its own
exit code. Anything else is a bug: one line, and the traceback only with --verbose.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from types import FrameType
from typing import Annotated, NoReturn

import typer

from appliance import __version__, log
from appliance.cli import alerts as alert_cmds
from appliance.cli import backup as backup_cmds
from appliance.cli import bench as bench_cmds
from appliance.cli import cloud as cloud_cmds
from appliance.cli import consolidate as consolidate_cmds
from appliance.cli import daemon as daemon_cmds
from appliance.cli import failback as failback_cmds
from appliance.cli import failover as failover_cmds
from appliance.cli import hosts as host_cmds
from appliance.cli import lab as lab_cmds
from appliance.cli import sites as site_cmds
from appliance.cli import status as status_cmds
from appliance.cli import users as user_cmds
from appliance.cli import web as web_cmds
from appliance.cli.context import State
from appliance.errors import EXIT_ERROR, EXIT_SIGNAL_BASE, ApplianceError

app = typer.Typer(
    name="appliance",
    help="Instant-recovery appliance: incremental recovery points of your servers, bootable in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(host_cmds.app, name="host")
app.add_typer(failover_cmds.app, name="failover")
app.add_typer(failback_cmds.app, name="failback")
app.add_typer(lab_cmds.app, name="lab")
app.add_typer(bench_cmds.app, name="bench")
app.add_typer(user_cmds.app, name="user")
backup_cmds.register(app)
consolidate_cmds.register(app)
daemon_cmds.register(app)
site_cmds.register(app)
cloud_cmds.register(app)
web_cmds.register(app)
status_cmds.register(app)
alert_cmds.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"appliance {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    home: Annotated[
        str | None,
        typer.Option(
            "--home", envvar="APPLIANCE_HOME", help="Where config, keys and chains live [default: /var/lib/appliance]"
        ),
    ] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log events as JSON lines on stderr")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logs, and tracebacks of internal errors")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version")
    ] = False,
) -> None:
    log.configure(json=log_json, level="debug" if verbose else "info")
    ctx.obj = State(home_override=home, verbose=verbose)


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def main() -> None:
    """Entry point: run the command, map every outcome to an exit status."""
    os.umask(0o077)
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGHUP, _raise_terminated)
    verbose = "-v" in sys.argv or "--verbose" in sys.argv
    try:
        result = app(standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except ApplianceError as exc:
        _error_line(exc.message, exc.hint)
        if verbose:
            traceback.print_exc()
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer wraps a Ctrl-C in Abort
            _error_line("interrupted; nothing half-done was recorded", None)
            sys.exit(EXIT_SIGNAL_BASE + signal.SIGINT)
        _internal_error(exc.__cause__ or exc, verbose)
    except typer.TyperException as exc:  # usage errors: typer prints them its own way
        show = getattr(exc, "show", None)
        if show is None:
            _internal_error(exc, verbose)
        else:
            show()
            sys.exit(int(getattr(exc, "exit_code", EXIT_ERROR)))
    except KeyboardInterrupt:
        _error_line("interrupted; nothing half-done was recorded", None)
        sys.exit(EXIT_SIGNAL_BASE + signal.SIGINT)
    except _Terminated as exc:
        _error_line(f"stopped by {exc}; nothing half-done was recorded", None)
        sys.exit(EXIT_SIGNAL_BASE + exc.signum)
    except Exception as exc:
        _internal_error(exc, verbose)


def _internal_error(exc: BaseException, verbose: bool) -> NoReturn:
    """A bug: say so in one line; the traceback is for --verbose."""
    _error_line(f"internal error: {type(exc).__name__}: {exc}", "run again with --verbose for the traceback")
    if verbose:
        traceback.print_exception(exc)
    sys.exit(EXIT_ERROR)


def _error_line(message: str, hint: str | None) -> None:
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
