"""What ``pip install .`` brings must cover what the package imports outside
its optional extras (``serve --tls`` once needed the test extra's trustme)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
# Imported only by the optional integrations (extras flask/django, the
# bench's --plot, the pytest plugin) or only on some platforms.
OPTIONAL = {"flask", "django", "matplotlib", "psutil", "termios", "pytest",
            "opentelemetry", "prometheus_client",  # extras otel, prometheus: metrics
            "distributed", "cloudpickle"}  # extra dask (the SDK's dependencies too)
# Distribution name -> import name, where they differ.
IMPORT_NAME = {"protobuf": "google"}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    # Every node but those under ``if TYPE_CHECKING:`` (read by type checkers
    # only, never imported at run time).
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _imports() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "aperturedb_pool").rglob("*.py"):
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_runtime_dependencies_cover_the_package_imports() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in meta["dependencies"]}
    provided = {IMPORT_NAME.get(d, d) for d in deps}
    third_party = {m for m in _imports()
                   if m not in sys.stdlib_module_names and m != "aperturedb_pool"}
    missing = third_party - provided - OPTIONAL
    assert not missing, f"imported but not a runtime dependency: {sorted(missing)}"
    assert "trustme" in deps  # serve --tls, adb_tls_server
