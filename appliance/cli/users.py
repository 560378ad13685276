# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance user add|list|passwd|role|remove` and `user token create|list|revoke`: who may use the console."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from appliance import bootstrap
from appliance.cli._output import table
from appliance.cli.context import state
from appliance.domain.users import ROLES
from appliance.errors import UserError
from appliance.services import users as user_service

app = typer.Typer(help="The web console's users (admin, operator, viewer) and API tokens.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens for scripts (Authorization: Bearer TOKEN).", no_args_is_help=True)
app.add_typer(tokens_app, name="token")

_STDIN = typer.Option("--password-stdin", help="Read the password from the first line of stdin (scripts)")


def _password(from_stdin: bool) -> str:
    """Asked twice on the terminal (never echoed), or one line of stdin; never an argument (ps shows those)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise UserError("no terminal to ask the password on", hint="pipe it with --password-stdin")
    first = typer.prompt("Password", hide_input=True, err=True)
    if typer.prompt("Again", hide_input=True, err=True) != first:
        raise UserError("the two passwords differ; nothing was changed")
    return str(first)


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Login name, e.g. alice")],
    role: Annotated[str, typer.Option("--role", help=f"One of {', '.join(ROLES)}")] = "viewer",
    password_stdin: Annotated[bool, _STDIN] = False,
) -> None:
    """Add a console user; the password is asked on the terminal and kept only as its argon2 hash."""
    home = state(ctx).home
    user = user_service.add(home, bootstrap.passwords(), name, role, _password(password_stdin))
    typer.echo(f"added {user.name} ({user.role})")


@app.command("list")
def list_users(ctx: typer.Context) -> None:
    """The console's users and their roles."""
    rows = [[u.name, u.role, f"{u.created:%Y-%m-%d %H:%M}"] for u in user_service.list_users(state(ctx).home)]
    typer.echo(table(["USER", "ROLE", "ADDED"], rows))


@app.command("passwd")
def passwd(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], password_stdin: Annotated[bool, _STDIN] = False
) -> None:
    """Set a user's password."""
    user_service.set_password(state(ctx).home, bootstrap.passwords(), name, _password(password_stdin))
    typer.echo(f"password of {name} set")


@app.command("role")
def role(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], new_role: Annotated[str, typer.Argument()]
) -> None:
    """Change a user's role (it applies from the user's next request)."""
    user_service.set_role(state(ctx).home, name, new_role)
    typer.echo(f"{name} is now {new_role}")


@app.command("remove")
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Remove a user and their tokens (their sessions end at their next request)."""
    user_service.remove(state(ctx).home, name)
    typer.echo(f"removed {name}")


@tokens_app.command("create")
def token_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user the token acts as (with that user's role)")],
    label: Annotated[str, typer.Option("--label", help="What the token is for, e.g. prometheus")] = "",
) -> None:
    """Print a new API token once (only its hash is kept)."""
    typer.echo(user_service.create_token(state(ctx).home, name, label))


@tokens_app.command("list")
def token_list(ctx: typer.Context) -> None:
    """Tokens by id, user and label (never the tokens themselves)."""
    rows = [[t.id, t.user, t.label, f"{t.created:%Y-%m-%d %H:%M}"] for t in user_service.tokens(state(ctx).home)]
    typer.echo(table(["ID", "USER", "LABEL", "CREATED"], rows))


@tokens_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: Annotated[str, typer.Argument(help="The token's id")]) -> None:
    """Revoke a token at once."""
    user_service.revoke_token(state(ctx).home, token_id)
    typer.echo(f"revoked {token_id}")
