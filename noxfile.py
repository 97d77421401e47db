"""The test stages, fast ones first; the README's test command runs them all:

    python3 -m venv .venv && .venv/bin/pip install -q nox && .venv/bin/nox

``nox`` stops at the first stage that fails. ``.venv/bin/nox -l`` lists the stages,
``.venv/bin/nox -s unit`` runs one, ``.venv/bin/nox -s integration -- -k drain -x`` passes
arguments to pytest. Every stage runs in the one virtualenv nox itself runs in (``.venv``),
set up by the first stage, so a stage run alone needs ``nox -s install`` once before.

The stages after ``integration`` need root and install Debian tools with apt-get when
missing (systemd-container, debootstrap, chromium, prometheus, nats-server, FUSE for
LazyFS); each
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


# The stages after integration: (session, pytest marker, what it proves); docs/testing.md.
MARKED_STAGES = (
    ("drill", "drill_full", "Every drill scenario end to end, as `edge-agent drill` runs them."),
    ("packaging", "packaging", "The built wheel, non-editable in a fresh venv, as users install."),
    ("power-loss", "power_loss", "Power cuts on LazyFS and the fsync order under strace (root)."),
    ("systemd", "systemd_real", "The README's systemd install under a real systemd (root)."),
    ("browser", "browser", "The console in headless chromium against a real agent."),
    ("prometheus", "prometheus", "promtool on the rules; a real Prometheus scraping an agent."),
    ("offline-bundle", "offline_bundle", "The offline bundle installed with no network, drilled."),
    ("replication", "replication", "The buffer replicated through a real 3-node nats-server."),
)


def _marked(marker: str, doc: str) -> object:
    def stage(session: nox.Session) -> None:
        _run(session, "pytest", "-m", marker)

    stage.__doc__ = doc
    return stage


for _name, _marker, _doc in MARKED_STAGES:
    nox.session(name=_name)(_marked(_marker, _doc))
