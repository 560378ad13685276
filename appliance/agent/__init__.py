# SPDX-License-Identifier: GPL-2.0-or-later
"""Code that runs on a protected host. Standard library only: it is shipped over SSH for every run.

The host receives one script, run by one fixed command line (`wire.READER_BOOTSTRAP`): the parts below,
concatenated in order, each without its imports of the other parts (in the script they share one
namespace). Each part stays an importable module here, so ruff, mypy and the tests see it whole.
"""

import ast
import functools
from pathlib import Path

HERE = Path(__file__).parent

# In the order they are shipped: the wire format first, `main` (which runs the script) last.
READER_PARTS = ("wire.py", "reader.py")
WRITER_PARTS = ("wire.py", "writer.py")


@functools.cache
def reader_source() -> bytes:
    """The reader's script, exactly as it is sent to the host."""
    return assemble(READER_PARTS)


@functools.cache
def writer_source() -> bytes:
    """The failback writer's script, exactly as it is sent to the target."""
    return assemble(WRITER_PARTS)


def assemble(parts: tuple[str, ...]) -> bytes:
    """One script of `parts` (paths under this folder): each after a line naming it, which maps a line of a
    traceback on the host back to its file; the imports of this package blanked, the lines kept."""
    script = []
    for part in parts:
        source = (HERE / part).read_text()
        script.append(f"# --- appliance/agent/{part}\n{_without_own_imports(source)}")
    return "".join(script).encode()


def _without_own_imports(source: str) -> str:
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if _imports_own(node):
            for i in range(node.lineno - 1, node.end_lineno or node.lineno):
                lines[i] = "\n"
    return "".join(lines)


def _imports_own(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[:2] == ["appliance", "agent"]
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[:2] == ["appliance", "agent"] for alias in node.names)
    return False
