"""Build the wheel operators install, from a copy of the source tree, outside the checkout.

Shared by tests/system/test_packaging.py and tests/system/test_systemd_real.py. Nothing here imports
the agent: the package is built with ``python -m build`` and looked at as a zip file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("agent", "recovery")
# Never copied into the build tree: local state that is not part of the source.
_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "out",
)


def run(
    cmd: list[str],
    *,
    cwd: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run cmd, capture its output, and fail with that output if it exits non-zero."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode} (cwd {cwd})\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def build_wheel(workdir: Path) -> Path:
    """``python -m build --wheel`` on a copy of the checkout; returns the one .whl.

    The copy keeps build/ and *.egg-info out of the checkout and keeps a stale build/lib
    in the checkout (which could still hold a deleted module) out of the wheel.
    """
    src = workdir / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE, symlinks=True)
    dist = workdir / "dist"
    run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
        cwd=workdir,
        timeout=600,
    )
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {wheels}"
    return wheels[0]


def source_packages() -> set[str]:
    """Every package (a dir with __init__.py) under agent/ and recovery/, dotted."""
    found = set()
    for top in TOP_PACKAGES:
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO)
            if "__pycache__" not in rel.parts:
                found.add(".".join(rel.parts))
    return found


def source_modules() -> set[str]:
    """Every .py file under agent/ and recovery/, as a path relative to the repo."""
    return {
        p.relative_to(REPO).as_posix()
        for top in TOP_PACKAGES
        for p in (REPO / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for commands run from the installed venv: no PYTHONPATH, no
    virtualenv of the test run leaking in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")
    }
    env.update(extra)
    return env
