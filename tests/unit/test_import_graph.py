"""The packages are layered (issue 19): imports point down, none into service/, no cycle.

The contract lives in pyproject.toml ([tool.importlinter]); import-linter checks it
against the source tree here, in the plain test run, so a new upward import fails CI
with the import chain that broke it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.harness import ROOT


def test_imports_point_down() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout
