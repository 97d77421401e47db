"""The offline install bundle (pytest -m offline_bundle; root, for `unshare -n`).

Builds it with the one command (ops/offline/build-bundle.sh), then, in a network namespace
that has nothing but loopback (proved: only `lo`, no route out; any proxy pointed at a
closed loopback port), installs it into a fresh venv with the bundle's install.sh and runs
`edge-agent drill --scenario primary-outage` from that venv. pip is told to use no index
and none of this machine's pip configuration (a find-links dir, extra indexes): the
bundle's wheels alone must be enough.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support import host_tools
from tests.support.packaging_build import REPO, clean_env, run

pytestmark = [pytest.mark.offline_bundle, pytest.mark.timeout(900)]

# Anything that tries the network in the namespace fails at once: loopback port 9 is closed.
NO_NET = {
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "PIP_NO_INDEX": "1",
}


def offline(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with sh in a new network namespace with only loopback up."""
    env = {
        k: v
        for k, v in clean_env(**NO_NET).items()
        if not k.startswith("PIP_") or k == "PIP_NO_INDEX"
    }
    return subprocess.run(
        ["unshare", "--net", "sh", "-ec", f"ip link set lo up\n{script}"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        if host_tools.required():
            pytest.fail("offline_bundle needs root (unshare --net)")
        pytest.skip("unshare --net needs root (CI runs as root)")
    out = tmp_path_factory.mktemp("bundle")
    proc = run([str(REPO / "ops" / "offline" / "build-bundle.sh"), str(out)], cwd=out, timeout=600)
    tarball = Path(proc.stdout.strip().splitlines()[-1])
    assert tarball.is_file() and tarball.parent == out, proc.stdout
    with tarfile.open(tarball) as tf:
        tf.extractall(out, filter="data")
    (root,) = [p for p in out.iterdir() if p.is_dir()]
    return root


def test_bundle_holds_the_agent_its_dependencies_units_config_and_installer(bundle: Path) -> None:
    wheels = {p.name.split("-")[0].lower() for p in (bundle / "wheels").glob("*.whl")}
    assert {
        "order_edge_agent",
        "aiohttp",
        "aiosqlite",
        "watchfiles",
        "orjson",
        "backoff",
        "dnspython",
        "prometheus_client",
        "rich",
        "yarl",
        "httptools",
    } <= wheels, wheels
    assert not list((bundle / "wheels").glob("*.tar.gz")), "an sdist would need a compiler"
    assert "tqdm" not in wheels
    # pip itself, so the server needs no ensurepip (python3-venv); no .deb, whose exact
    # python3.11 version pin would break dpkg on a server a few point releases apart.
    assert "pip" in wheels, wheels
    assert not (bundle / "debs").exists()
    for f in (
        "install.sh",
        "systemd/install.sh",
        "systemd/edge-agent.service",
        "systemd/edge-recover@.service",
        "systemd/edge-agent.sysusers.conf",
        "systemd/edge-agent.tmpfiles.conf",
        "config/agent.toml",
        "SHA256SUMS",
        "TARGET",
    ):
        assert (bundle / f).is_file(), f
    assert (bundle / "TARGET").read_text().strip().startswith("cp311-")


def test_installs_with_no_network_and_runs_a_drill(bundle: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # The namespace has no way out: prove it before trusting the install below.
    proof = offline(
        "ip -o link show | awk -F': ' '{print $2}'; echo routes:; ip route show", tmp_path, 30
    )
    assert proof.returncode == 0, proof.stderr
    links, routes = proof.stdout.split("routes:")
    assert links.split() == ["lo"], proof.stdout
    assert routes.strip() == "", proof.stdout

    # A server without python3-venv: ensurepip cannot be imported (shadowed on PYTHONPATH).
    hide = tmp_path / "no-ensurepip" / "ensurepip"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('no ensurepip: python3-venv missing')\n")
    no_venv_pkg = f"PYTHONPATH={hide.parent} "
    assert offline(f"{no_venv_pkg}python3 -c 'import ensurepip'", tmp_path, 30).returncode != 0
    install = offline(f"{no_venv_pkg}{bundle}/install.sh --venv {venv}", tmp_path, 300)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "installed edge-agent" in install.stdout, install.stdout

    # What got installed is exactly the bundle's wheels.
    listed = json.loads(
        offline(f"{venv}/bin/pip list --format json --isolated", tmp_path, 60).stdout
    )
    versions = {p["name"].lower().replace("-", "_"): p["version"] for p in listed}
    for wheel in (bundle / "wheels").glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if name.lower() in versions:
            assert versions[name.lower()] == version, (name, version, versions[name.lower()])
    assert versions["order_edge_agent"] == (bundle / "VERSION").read_text().strip()
    assert "pip" in versions  # the bundle's pip (compared above), not ensurepip's

    drill = offline(
        f"{venv}/bin/edge-agent drill --scenario primary-outage --report {tmp_path / 'drill.json'}",
        tmp_path,
        300,
    )
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "1 passed, 0 failed" in drill.stdout, drill.stdout
    report = json.loads((tmp_path / "drill.json").read_text())
    assert report["passed"] is True


def test_a_damaged_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    (copy / "config" / "agent.toml").write_text("tampered\n")
    proc = offline(f"{copy}/install.sh --venv {tmp_path / 'v'}", tmp_path, 60)
    assert proc.returncode != 0
    assert "damaged" in proc.stderr
    assert not (tmp_path / "v").exists()
