"""Debian tools the heavy test stages need (strace, systemd-nspawn, debootstrap),
installed with apt-get when missing: CI runs on a clean machine, as root."""

from __future__ import annotations

import os
import shutil
import subprocess


def required() -> bool:
    """Under CI a missing prerequisite fails a stage instead of skipping it."""
    return os.environ.get("CI") == "true" or os.environ.get("POWERLOSS_REQUIRED") == "1"


def apt_get(*args: str, timeout: float) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=600", *args],
        check=True,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=timeout,
    )


def ensure(binaries: dict[str, str]) -> None:
    """{binary: Debian package}: install the packages of the binaries not on PATH."""
    missing = sorted({pkg for binary, pkg in binaries.items() if shutil.which(binary) is None})
    if not missing:
        return
    apt_get("update", "-qq", timeout=600)
    apt_get("install", "-y", "-qq", "--no-install-recommends", *missing, timeout=900)
