# SPDX-License-Identifier: GPL-2.0-or-later
"""Small files under APPLIANCE_HOME: durable writes (a record is either the old one or the new one, never
half of each), and typed reads (a record that is damaged or not the appliance's is one DamagedFileError
naming the file and what is wrong, never a KeyError or TypeError deep in a command)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from appliance.errors import ApplianceError, ConfigError, DamagedFileError, StoreFullError

T = TypeVar("T")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """A temporary file of its own (two writers never share one), fsync, rename over the old file, fsync
    the folder: readers see the old content or the new one, and of two concurrent writers one wins whole."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(f"no room to write {path.name}: the appliance's disk is full") from exc
        raise


@contextlib.contextmanager
def full_disk_as_store_full(what: str) -> Iterator[None]:
    """An OSError of a full disk (or quota) raised in the block becomes StoreFullError naming `what`; any
    other error passes as it is."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(f"the appliance's disk is full while writing {what}") from exc
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def damaged(path: Path, problem: str) -> DamagedFileError:
    return DamagedFileError(f"{path} is damaged: {problem}")


def read_json(path: Path) -> object:
    """The JSON document in `path`. A file that cannot be read, is empty, is not text or not JSON is a
    DamagedFileError naming it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DamagedFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_json(raw, path)


def decode_json(raw: bytes, path: Path) -> object:
    """The JSON document `raw` read from `path` (named if it is not one)."""
    if not raw.strip():
        raise damaged(path, "it is empty")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise damaged(path, "it is not text") from exc
    except (ValueError, RecursionError) as exc:
        raise damaged(path, f"it is not JSON ({exc})") from exc


def read_as(path: Path, kind: type[T]) -> T:
    """The record in `path` as `kind` (a dataclass, list[...], dict[str, ...]), every field checked against
    its annotation: a missing or mistyped field is a DamagedFileError naming the file and the field."""
    return as_type(read_json(path), kind, path)


def as_type(value: object, kind: type[T], path: Path, where: str = "") -> T:
    """`value` (decoded JSON from `path`, at field `where`) as `kind`; see `read_as`."""
    return typing.cast(T, _convert(value, kind, path, where))


def _convert(value: object, kind: Any, path: Path, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    parse = getattr(kind, "parse", None)  # a value the record keeps as text: Network ("bridge=br0"), ...
    if parse is not None:
        text = _expect(value, str, kind, path, where)
        try:
            return parse(text)
        except ApplianceError as exc:
            raise damaged(path, f"{_what(where)}: {exc.message}") from exc
    if dataclasses.is_dataclass(kind):
        return _dataclass(_expect(value, dict, kind, path, where), kind, path, where)
    if origin in (list, tuple):
        items = _expect(value, list, kind, path, where)
        converted = [_convert(v, args[0], path, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(converted) if origin is tuple else converted
    if kind is dict or origin is dict:
        values = args[1] if args else object
        return {
            k: _convert(v, values, path, _field(where, k)) for k, v in _expect(value, dict, kind, path, where).items()
        }
    if kind is object:
        return value
    if kind is datetime:
        try:
            return datetime.fromisoformat(_expect(value, str, kind, path, where))
        except ValueError:
            raise damaged(path, f"{_what(where)} holds {value!r}, not a time") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (str, int, float, bool):
        return _expect(value, kind, kind, path, where)
    raise TypeError(f"no reader for {kind!r}")


def _dataclass(doc: dict[str, object], kind: Any, path: Path, where: str) -> Any:
    hints = _hints(kind)
    values = {}
    for f in dataclasses.fields(kind):
        if f.name in doc:
            values[f.name] = _convert(doc[f.name], hints[f.name], path, _field(where, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise damaged(path, f"{_what(_field(where, f.name))} is missing")
    try:
        return kind(**values)
    except (ApplianceError, ValueError) as exc:  # the type's own checks: a VM's memory, a disk bus ...
        raise damaged(path, f"{_what(where)}: {exc}") from exc


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def _expect(value: object, json_type: type[T], kind: Any, path: Path, where: str) -> T:
    exact = isinstance(value, json_type) and not (json_type in (int, float) and isinstance(value, bool))
    if not exact:
        raise damaged(path, f"{_what(where)} holds {_json_name(value)}, not {_wanted(kind)}")
    return typing.cast(T, value)


def _field(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _what(where: str) -> str:
    return f"field {where!r}" if where else "it"


def _json_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return next(n for t, n in names.items() if isinstance(value, t))


def _wanted(kind: Any) -> str:
    origin = typing.get_origin(kind) or kind
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array",
             tuple: "an array", dict: "an object", datetime: "a time"}  # fmt: skip
    return names.get(origin, "an object" if dataclasses.is_dataclass(origin) else "a string")


def private_dir(path: Path) -> Path:
    """A folder only root can read: keys, host records and backups live in such folders.

    Only a folder this call creates gets its mode set: an existing one (say `--home /tmp`) is the
    operator's, and is left exactly as it is."""
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        try:
            missing.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(missing, 0o700)  # mkdir's mode is masked by the umask
    return path


def record_names(folder: Path, pattern: re.Pattern[str]) -> list[str]:
    """The names of the JSON records in `folder` whose name matches `pattern` (a host or site name)."""
    if not folder.exists():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if pattern.match(p.stem))


def copy_private_key(source: Path, dest: Path, root: Path) -> str:
    """Copy an SSH private key to `dest` (0600) unless it is that file already; its path relative to `root`.

    :raises ConfigError: the key cannot be read.
    """
    if source.resolve() != dest.resolve():
        try:
            shutil.copyfile(source, dest)
        except OSError as exc:
            raise ConfigError(f"cannot read SSH key {source}: {exc.strerror}") from exc
    dest.chmod(0o600)
    return str(dest.relative_to(root))
