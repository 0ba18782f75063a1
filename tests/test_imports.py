"""Import direction between probes, modules and heads: probes -> modules -> heads, never back (no cycle).

Read from the source with ``ast`` so that imports inside functions count too (a lazy import is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hirespath

PACKAGE = Path(hirespath.__file__).parent
# subpackage -> the hirespath subpackages it must not import
FORBIDDEN = {"heads": {"modules", "probes"}, "modules": {"probes"}}


def imported_subpackages(source: str, package: str) -> set[str]:
    """The hirespath subpackages that ``source`` (a module of ``package``, e.g. "hirespath.modules") imports,
    absolute or relative, at any depth of the file."""
    parts = package.split(".")
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            names = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        out |= {n[1] for n in names if len(n) > 1 and n[0] == "hirespath"}
    return out


def test_import_reader_sees_relative_and_lazy_imports():
    code = "def f():\n    from ..heads.mil import ABMIL\n    from .. import probes\n    import hirespath.data.mil\n"
    assert imported_subpackages(code, "hirespath.modules") == {"heads", "probes", "data"}
    assert imported_subpackages("from .mil import x\nimport torch\n", "hirespath.heads") == {"heads"}


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_no_upward_imports(sub):
    bad = [
        f"{path.relative_to(PACKAGE.parent)} imports hirespath.{dst}"
        for path in sorted((PACKAGE / sub).rglob("*.py"))
        for dst in sorted(imported_subpackages(path.read_text(), f"hirespath.{sub}") & FORBIDDEN[sub])
    ]
    assert not bad, bad
