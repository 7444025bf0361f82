"""The import contract of pyproject.toml's ``[tool.importlinter]`` holds, and breaking it fails ``lint-imports``.

Layers: opsctl and bench on top of tasks, on top of monitoring, on top of serving; the pipeline steps
in tasks do not import each other; no import cycles between the modules of a package.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "serving", "monitoring", "opsctl", "bench")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

LAYERS = "Packages are layered: opsctl and bench on tasks on monitoring on serving"
INDEPENDENT_STEPS = "Pipeline steps do not import each other"
NO_CYCLES = "No import cycles between the modules of a package"
CONTRACTS = (LAYERS, INDEPENDENT_STEPS, NO_CYCLES)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` (and only those: they come first on the path)."""
    environment = os.environ | {"PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=root, env=environment, capture_output=True,
                          text=True, timeout=600, check=False)


def verdicts(output: str) -> dict[str, str]:
    """Contract name (its start) -> "KEPT" or "BROKEN", from lint-imports' summary lines."""
    found = {}
    for contract in CONTRACTS:
        match = re.search(rf"^{re.escape(contract)} (KEPT|BROKEN)\b", output, re.MULTILINE)
        if match:
            found[contract] = match.group(1)
    return found


def test_the_repository_keeps_every_contract():
    finished = lint_imports(ROOT)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert verdicts(finished.stdout) == {contract: "KEPT" for contract in CONTRACTS}, finished.stdout


@pytest.mark.parametrize("module, planted, broken", [
    ("serving/triton_client.py", "from tasks.errors import PipelineError", LAYERS),  # what it did before
    ("tasks/finetune.py", "from tasks import distill", INDEPENDENT_STEPS),
    ("serving/model_repository.py", "import serving.replica_sync", NO_CYCLES),  # replica_sync imports it
], ids=["serving-imports-tasks", "step-imports-step", "cycle-in-serving"])
def test_a_planted_import_breaks_its_contract(tmp_path, module, planted, broken):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")

    finished = lint_imports(tmp_path)

    assert finished.returncode != 0, finished.stdout
    found = verdicts(finished.stdout)
    assert found[broken] == "BROKEN", finished.stdout
    assert [contract for contract, verdict in found.items() if verdict == "BROKEN"] == [broken], finished.stdout
