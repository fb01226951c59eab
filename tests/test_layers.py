"""The package's layers: the import-linter contract in pyproject.toml holds (and fails on a planted upward
import), no module imports another inside a function, and no two modules import each other, even indirectly."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "ldm"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package and pyproject.toml under ``root`` (a fresh process: grimp reads the files)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layers_contract_is_kept():
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "KEPT" in result.stdout and "BROKEN" not in result.stdout


@pytest.mark.slow
def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "ldm", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    planted = tmp_path / "ldm" / "core" / "paths.py"
    planted.write_text(planted.read_text() + "\nfrom ldm.training import driver  # noqa: E402,F401 (planted)\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "ldm.core.paths -> ldm.training.driver" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("module, planted, contract, chain", [
    ("diffusion/guidance.py", "from ldm.io import checkpoints", "ldm.diffusion imports only ldm.core",
     "ldm.diffusion.guidance -> ldm.io.checkpoints"),
    ("eval/report.py", "from ldm.bench import timing", "ldm.eval, ldm.bench and ldm.serve import nothing of each other",
     "ldm.eval.report -> ldm.bench.timing"),
    ("systems/optim.py", "from lightning.pytorch.trainer import Trainer",
     "nothing below ldm.training imports Lightning's Trainer", "ldm.systems.optim -> lightning.pytorch.trainer"),
])
def test_each_architecture_rule_breaks_on_a_planted_violation(tmp_path, module, planted, contract, chain):
    """Each contract of docs/architecture.md's table fails on the import it forbids."""
    shutil.copytree(PACKAGE, tmp_path / "ldm", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "ldm" / module
    target.write_text(target.read_text() + f"\n{planted}  # noqa: E402,F401 (planted)\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    summary = " ".join(result.stdout.split())  # contract names wrap at 80 columns
    verdict = re.search(re.escape(contract) + r".*? (KEPT|BROKEN)", summary)
    assert verdict and verdict.group(1) == "BROKEN", result.stdout[-3000:]
    assert chain in result.stdout, result.stdout[-3000:]


NESTED_LDM_IMPORT = re.compile(r"(^[ \t]+|[:;][ \t]*)(from[ \t]+ldm\b|import[ \t]+([\w. \t]+,[ \t]*)*ldm\b)", re.M)


def _function_level_imports(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """``file:line module`` for every import of ``ldm`` written inside a function of ``path``."""
    text = path.read_text()
    if not NESTED_LDM_IMPORT.search(text):  # an import inside a function is indented or follows a ``:`` / ``;``
        return []
    found = []
    for func in (n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "ldm"]
    return found


def test_no_module_of_the_package_is_imported_inside_a_function():
    """An import inside a function may defer an optional heavy dependency (open_clip, lpips, diffusers), never
    one of the package's own modules: that would hide a cycle or an upward import from the contract."""
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _function_level_imports(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("planted, module", [("from ldm.core import paths", "ldm.core"),
                                             ("import os, ldm.core.paths as p", "ldm.core.paths"),
                                             ("x = 1; import ldm", "ldm")])
def test_an_import_inside_a_function_is_found(tmp_path, planted, module):
    path = tmp_path / "m.py"
    path.write_text(f"import ldm\n\n\ndef f():\n    \"\"\"A function.\"\"\"\n    {planted}\n")
    assert _function_level_imports(path, tmp_path) == [f"m.py:6 {module}"]


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("ldm")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "\n".join(cycles)
