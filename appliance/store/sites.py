# SPDX-License-Identifier: GPL-2.0-or-later
"""Site records (other appliances this one pulls points from), and the keys this one grants to sites."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from appliance.domain.models import HOST_NAME, Site
from appliance.errors import DamagedFileError, HostNotFoundError
from appliance.log import get_logger
from appliance.store.files import copy_private_key, damaged, read_as, read_json, record_names, write_json
from appliance.store.layout import Home

log = get_logger(__name__)


def load(home: Home, name: str) -> Site:
    path = home.site_record(name)
    if not path.exists():
        raise HostNotFoundError(f"no site named {name!r}", hint="`appliance site list` lists them")
    site = read_as(path, Site)
    if site.name != name:
        raise damaged(path, f"it is the record of site {site.name!r}")
    return site


def save(home: Home, site: Site) -> None:
    home.ensure()
    home.sites_dir.mkdir(mode=0o700, exist_ok=True)
    write_json(home.site_record(site.name), dataclasses.asdict(site))


def exists(home: Home, name: str) -> bool:
    return home.site_record(name).exists()


def names(home: Home) -> list[str]:
    return record_names(home.sites_dir, HOST_NAME)


def install_key(home: Home, name: str, source: Path) -> str:
    """Copy the private key for the site under APPLIANCE_HOME (0600); the record refers to the copy."""
    home.ensure()
    return copy_private_key(source, home.site_key_file(name), home.root)


def remove(home: Home, name: str) -> None:
    home.site_record(name).unlink(missing_ok=True)
    home.site_key_file(name).unlink(missing_ok=True)


def add_authorized_key(path: Path, line: str, comment: str) -> None:
    """Put `line` in an authorized_keys file, replacing a line that ends with the same `comment` (a grant
    given again), written whole and renamed into place (0600): sshd never reads half a file."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [x for x in lines if not x.rstrip().endswith(" " + comment)]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join([*kept, line]) + "\n")
    os.replace(tmp, path)


# -- on the source: the DR sites granted `serve-replica`, and what each confirmed holding ------------------


def grant_site(home: Home, name: str) -> None:
    """Record the grant (what it confirmed so far is kept when a grant is given again)."""
    path = home.grant_record(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        write_json(path, {"site": name, "confirmed": {}})


def confirmed(home: Home) -> dict[str, dict[str, str] | None]:
    """{granted site: {host: the newest point it confirmed holding}}; None for a record that does not read
    (logged): such a site is taken as having confirmed nothing, which keeps more, never less."""
    folder = home.grant_record("x").parent
    out: dict[str, dict[str, str] | None] = {}
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            doc = read_json(path)
            held = doc.get("confirmed") if isinstance(doc, dict) else None
            if not isinstance(held, dict):
                raise damaged(path, "it has no confirmed points")
            out[path.stem] = {str(k): str(v) for k, v in held.items()}
        except DamagedFileError as exc:
            log.warning("store.grant_unreadable", file=str(path), error=exc.message)
            out[path.stem] = None
    return out


def confirm(home: Home, site: str, host: str, point_id: str) -> None:
    """Site `site` holds `point_id` of `host` (it asked for the next point on top of it)."""
    path = home.grant_record(site)
    if not path.exists():
        return  # not granted through `site grant` (a key installed by hand): nothing held for it
    doc = read_json(path)
    held = doc.get("confirmed") if isinstance(doc, dict) else None
    if not isinstance(held, dict):
        raise damaged(path, "it has no confirmed points")
    if held.get(host) != point_id:
        held[host] = point_id
        write_json(path, {"site": site, "confirmed": held})


def replication_holds(home: Home, host: str) -> tuple[dict[str, str], bool]:
    """({point id: why it is held} of the points granted sites confirmed for `host`, whether some granted
    site confirmed nothing of it yet (then every hash list is kept: it may ask for any point))."""
    holds: dict[str, str] = {}
    unconfirmed = False
    for site, held in confirmed(home).items():
        if held is not None and host in held:
            holds[held[host]] = f"replication to site {site}"
        else:
            unconfirmed = True
    return holds, unconfirmed
