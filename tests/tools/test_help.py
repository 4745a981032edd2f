"""The tools in ``tools/``: each answers ``--help`` run as ``python -m tools.NAME`` from the repository root, and none
imports another (only the shared ``tools.common``). A new tool is found by listing the folder."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
SHARED = {"__init__", "common"}  # the package and its helper module: not tools
MODULES = sorted(TOOLS.glob("*.py"))
SCRIPTS = [p.stem for p in MODULES if p.stem not in SHARED]


def test_the_tools_are_listed():
    assert "make_corpus" in SCRIPTS and "common" not in SCRIPTS  # an empty list would pass the tests below


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    done = subprocess.run(
        [sys.executable, "-m", f"tools.{name}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    usage = done.stdout.splitlines()[0]
    assert usage.startswith("usage: ") and f"tools.{name}" in usage.split(), usage


def tools_imported(path: Path) -> set[str]:
    """The ``tools`` modules ``path`` imports (``tools.NAME``), a sibling imported by its bare name included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative, inside the tools package
                module = f"tools.{module}" if module else "tools"
            names = [f"{module}.{alias.name}" for alias in node.names] if module == "tools" else [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tools":
                found.add(".".join(parts[:2]))
            elif parts[0] in SCRIPTS:  # `from sweep_observers import ...`: the script's folder on sys.path
                found.add(f"tools.{parts[0]}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_no_tool_imports_another(path):
    assert tools_imported(path) <= {"tools.common"}, f"{path.name}: import what tools share from tools.common"


def test_tools_imported_sees_siblings(tmp_path):
    script = tmp_path / "x.py"
    script.write_text(
        "from tools import common, bench_run\nimport tools.sweep_observers\nfrom make_corpus import main\n"
        "from .common import parser\n"
    )
    assert tools_imported(script) == {"tools.common", "tools.bench_run", "tools.sweep_observers", "tools.make_corpus"}
