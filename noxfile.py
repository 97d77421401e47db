"""The test stages, fast ones first; the README's test command runs them all:

    python3 -m venv .venv && .venv/bin/pip install -q nox && .venv/bin/nox

``nox`` stops at the first stage that fails. ``.venv/bin/nox -l`` lists the stages,
``.venv/bin/nox -s unit`` runs one, ``.venv/bin/nox -s integration -- -k drain -x`` passes
arguments to pytest. Every stage runs in the one virtualenv nox itself runs in (``.venv``),
set up by the first stage, so a stage run alone needs ``nox -s install`` once before.

The stages after ``integration`` need root and install Debian tools with apt-get when
missing (systemd-container, debootstrap, chromium, prometheus, FUSE for LazyFS); each
skips with its reason where that is impossible. docs/testing.md describes them.
"""

from __future__ import annotations

import sys

import nox

nox.options.default_venv_backend = "none"
nox.options.stop_on_first_error = True

PYTHON = sys.executable  # .venv's python: the environment nox was installed in


def _run(session: nox.Session, *args: str) -> None:
    session.run(PYTHON, "-m", *args, *session.posargs, external=True)


@nox.session
def install(session: nox.Session) -> None:
    """The agent (editable) and the test tools, into .venv."""
    session.run(PYTHON, "-m", "pip", "install", "-q", "-e", ".[test]", external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's rules and its formatting."""
    session.run(PYTHON, "-m", "ruff", "check", ".", external=True)
    session.run(PYTHON, "-m", "ruff", "format", "--check", ".", external=True)


@nox.session
def types(session: nox.Session) -> None:
    """mypy, strict (configured in pyproject.toml)."""
    _run(session, "mypy")


@nox.session
def unit(session: nox.Session) -> None:
    """Pure logic, no servers, no subprocesses: seconds."""
    _run(session, "pytest", "tests/unit")


@nox.session
def integration(session: nox.Session) -> None:
    """Real loopback servers, real files, the agent in-process and as a subprocess."""
    _run(session, "pytest", "tests/integration")


@nox.session
def drill(session: nox.Session) -> None:
    """Every drill scenario end to end, as `edge-agent drill` runs them."""
    _run(session, "pytest", "-m", "drill_full")


@nox.session
def packaging(session: nox.Session) -> None:
    """The built wheel, installed non-editable in a fresh venv, as users install it."""
    _run(session, "pytest", "-m", "packaging")


@nox.session(name="power-loss")
def power_loss(session: nox.Session) -> None:
    """Power cuts on LazyFS and the fsync order under strace (root, FUSE)."""
    _run(session, "pytest", "-m", "power_loss")


@nox.session
def systemd(session: nox.Session) -> None:
    """The README's systemd install under a real systemd in a container (root)."""
    _run(session, "pytest", "-m", "systemd_real")


@nox.session
def browser(session: nox.Session) -> None:
    """The console in headless chromium against a real agent."""
    _run(session, "pytest", "-m", "browser")


@nox.session
def prometheus(session: nox.Session) -> None:
    """promtool on the alert rules; a real Prometheus scraping a real agent."""
    _run(session, "pytest", "-m", "prometheus")


@nox.session(name="offline-bundle")
def offline_bundle(session: nox.Session) -> None:
    """The offline install bundle built, installed with no network, drilled."""
    _run(session, "pytest", "-m", "offline_bundle")
