"""What operators install: the built wheel, non-editable, in a fresh venv outside the checkout.

CI runs ``pytest -m packaging``. It needs the package index (or the pip cache) for the
build backend and the dependencies, and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support.packaging_build import (
    REPO,
    build_wheel,
    clean_env,
    run,
    source_modules,
    source_packages,
    wheel_files,
)

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel installed the way the README says
    (``pip install``, not ``-e``)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", str(root)], cwd=root.parent, timeout=120)
    run(
        [str(root / "bin" / "pip"), "install", "-q", str(wheel)],
        cwd=root.parent,
        timeout=600,
        env=clean_env(),
    )
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the checkout: ``import agent`` cannot find the sources."""
    assert not tmp_path.resolve().is_relative_to(REPO)
    return tmp_path


def test_every_source_package_is_in_the_wheel(wheel: Path) -> None:
    files = wheel_files(wheel)
    packages = source_packages()
    assert {"agent", "agent.drill", "agent.sandbox", "recovery"} <= packages, packages
    missing = sorted(p for p in packages if p.replace(".", "/") + "/__init__.py" not in files)
    assert not missing, f"packages in the source tree but not in {wheel.name}: {missing}"
    missing_modules = sorted(source_modules() - files)
    assert not missing_modules, f"modules not in {wheel.name}: {missing_modules}"


def test_wheel_ships_the_console_page(wheel: Path) -> None:
    """The one set of data files: the console (agent/console/*.html, .css, .js)."""
    files = wheel_files(wheel)
    assets = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "agent" / "console").iterdir()
        if p.suffix in (".html", ".css", ".js")
    }
    assert {"agent/console/index.html", "agent/console/console.js"} <= assets
    assert assets <= files, sorted(assets - files)


def test_wheel_carries_the_licence(wheel: Path) -> None:
    """Apache-2.0 as an SPDX expression in the metadata, and the full text in the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode("utf-8")
        (licence,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(licence) == (REPO / "LICENSE").read_bytes()
    assert "License-Expression: Apache-2.0" in text.splitlines(), text[:800]


def test_wheel_ships_no_tests_or_stray_top_level_packages(wheel: Path) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_files(wheel)}
    tops = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert tops == {"agent", "recovery"}, tops


def test_installed_package_is_the_venvs_not_the_checkouts(venv: Path, outside: Path) -> None:
    out = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import agent, recovery; print(agent.__file__); print(recovery.__file__)",
        ],
        cwd=outside,
        timeout=60,
        env=clean_env(),
    ).stdout.split()
    for path in out:
        assert Path(path).resolve().is_relative_to(venv.resolve()), out
        assert not Path(path).resolve().is_relative_to(REPO), out


@pytest.mark.parametrize(
    "argv",
    [
        ["bin/edge-agent", "--help"],
        ["bin/edge-recover", "--help"],
    ],
)
def test_console_scripts_help(venv: Path, outside: Path, argv: list[str]) -> None:
    out = run([str(venv / argv[0]), *argv[1:]], cwd=outside, timeout=60, env=clean_env())
    assert "usage:" in out.stdout.lower(), out.stdout


@pytest.mark.parametrize(
    "argv, name",
    [
        (["bin/edge-agent", "--version"], "edge-agent"),
        (["bin/edge-recover", "--version"], "edge-recover"),
        (["bin/python", "-m", "agent", "--version"], "edge-agent"),
        (["bin/python", "-m", "recovery", "--version"], "edge-recover"),
    ],
)
def test_version(venv: Path, outside: Path, argv: list[str], name: str) -> None:
    out = run([str(venv / argv[0]), *argv[1:]], cwd=outside, timeout=60, env=clean_env())
    assert out.stdout.strip() == f"{name} {VERSION}", (out.stdout, out.stderr)


def test_drill_runs_from_the_installed_package(venv: Path, outside: Path) -> None:
    """The README's first command, against the wheel: the drill imports agent.drill and
    agent.sandbox and runs the agent as a subprocess of the venv's python."""
    proc = subprocess.run(
        [
            str(venv / "bin" / "edge-agent"),
            "drill",
            "--scenario",
            "primary-outage",
            "--report",
            str(outside / "drill.json"),
        ],
        cwd=outside,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"drill exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "1 passed, 0 failed" in proc.stdout, proc.stdout
    assert (outside / "drill.json").is_file()
