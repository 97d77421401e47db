"""Every shell script in ops/ and systemd/ is safe to type: ``--help`` and a mistyped option
do nothing.

Each script runs as a real subprocess, as root would (``id -u`` says 0), in an empty temp
cwd/HOME/TMPDIR, with a PATH whose first directory holds stubs for every command that
changes the machine (users, units, packages, pip, venvs, archives). A stub only appends its
name and arguments to a log. ``--help``/``-h`` must print the usage and exit 0; an unknown
option must print a usage line on stderr and exit 2; in both cases no stub may have been
called and no file or directory may have appeared (issue 21: ``build-bundle.sh --help`` made
a directory named ``--help``; ``install.sh --help`` as root ran the whole install).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Commands that install, configure or build something; each is replaced by a recorder.
STUBBED = (
    "apt",
    "apt-get",
    "build",
    "chmod",
    "chown",
    "cp",
    "curl",
    "debootstrap",
    "dpkg",
    "groupadd",
    "install",
    "ln",
    "mkdir",
    "mktemp",
    "mv",
    "pip",
    "pip3",
    "python",
    "python3",
    "python3.11",
    "rm",
    "sha256sum",
    "sudo",
    "systemctl",
    "systemd-analyze",
    "systemd-nspawn",
    "systemd-sysusers",
    "systemd-tmpfiles",
    "tar",
    "touch",
    "useradd",
    "wget",
    "xargs",
)


def scripts() -> list[Path]:
    """Every shell script under ops/ and systemd/ (by its #! line), so a new one is covered."""
    found = []
    for top in ("ops", "systemd"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.read_bytes()[:2] == b"#!":
                found.append(path)
    return found


def test_every_shell_script_is_covered() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in scripts()}
    assert {
        "ops/offline/install.sh",
        "ops/offline/build-bundle.sh",
        "systemd/install.sh",
        "systemd/check.sh",
    } <= names, names


def stage(tmp: Path, script: Path) -> Path:
    """Where the script runs from: the checkout, except the offline install.sh, which runs
    from an unpacked bundle (its own dir holds TARGET, SHA256SUMS, systemd/install.sh)."""
    if script != ROOT / "ops" / "offline" / "install.sh":
        return script
    bundle = tmp / "bundle"
    (bundle / "systemd").mkdir(parents=True)
    shutil.copy2(script, bundle / "install.sh")
    shutil.copy2(ROOT / "systemd" / "install.sh", bundle / "systemd" / "install.sh")
    (bundle / "TARGET").write_text("cp311-linux_x86_64\n")
    (bundle / "SHA256SUMS").write_text("")
    return bundle / "install.sh"


def tree(base: Path) -> set[str]:
    return {p.relative_to(base).as_posix() for p in base.rglob("*")}


@pytest.mark.parametrize(
    "args",
    [["--help"], ["-h"], ["--bogus"], ["-x"], ["--bogus", "--help"]],
    ids=lambda a: " ".join(a),
)
@pytest.mark.parametrize("script", scripts(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_answers_help_and_refuses_unknown_options_doing_nothing(
    tmp_path: Path, script: Path, args: list[str]
) -> None:
    stubs, log = tmp_path / "stubs", tmp_path / "called.log"
    stubs.mkdir()
    for name in STUBBED:
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
    # id -u says root, so a script that skips its options would go on to install.
    (stubs / "id").write_text(f'#!/bin/sh\necho "id $*" >> "{log}"\necho 0\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    work = tmp_path / "cwd"
    work.mkdir()
    target = stage(tmp_path, script)
    repo_before = tree(ROOT / "ops") | tree(ROOT / "systemd")
    before = tree(tmp_path)
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "PYTHON": str(stubs / "python3"),
    }
    proc = subprocess.run(
        [str(target), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    name = script.name
    if args[0] in ("--help", "-h"):
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        assert proc.stdout.startswith("usage: ") and name in proc.stdout.splitlines()[0], (
            proc.stdout
        )
        assert "-h, --help" in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        assert f"unknown option {args[0]}" in proc.stderr, proc.stderr
        assert "usage: " in proc.stderr and name in proc.stderr, proc.stderr
        assert proc.stdout == "", proc.stdout
    called = log.read_text() if log.exists() else ""
    assert called == "", f"{name} {' '.join(args)} ran commands:\n{called}"
    assert tree(tmp_path) == before, sorted(tree(tmp_path) - before)
    assert tree(ROOT / "ops") | tree(ROOT / "systemd") == repo_before


def test_offline_install_refuses_venv_without_a_directory(tmp_path: Path) -> None:
    """``--venv`` followed by an option (or nothing) is a usage error, not a venv named so."""
    target = stage(tmp_path, ROOT / "ops" / "offline" / "install.sh")
    for args in (["--venv"], ["--venv", "--help"], ["--venv="]):
        proc = subprocess.run(
            [str(target), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "PYTHON": "/bin/false"},
        )
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert "--venv needs a directory" in proc.stderr, proc.stderr
