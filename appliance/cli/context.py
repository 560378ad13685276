# SPDX-License-Identifier: GPL-2.0-or-later
"""What global options hand to each command."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from appliance import bootstrap
from appliance.ports import Tools
from appliance.store.layout import Home


@dataclass(slots=True)
class State:
    home_override: str | None
    verbose: bool

    @property
    def home(self) -> Home:
        return bootstrap.home(self.home_override).ensure()

    @property
    def tools(self) -> Tools:
        return bootstrap.tools(self.home)


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj
