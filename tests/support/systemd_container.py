"""A real systemd (Debian 12) booted with systemd-nspawn, for tests/system/test_systemd_real.py.

The root filesystem is built once with debootstrap and cached outside the checkout
(ROOTFS_CACHE); every boot runs on ``--volatile=overlay``: the cached tree is the read-only
lower layer and everything the test writes goes to a tmpfs, so each run starts pristine and
the cache is never modified. The container shares the host's network namespace (no
--private-network): the agent inside listens on the host's loopback, where the test and its
fake order center are.

Commands run inside with ``nsenter -a`` on the container's PID 1 (there is no host systemd
here, hence --register=no --keep-unit). Needs root.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support import host_tools

SUITE = "bookworm"
# jq: docs/operations.md pipes journalctl into jq, and the test runs that pipeline as written.
INCLUDE = "systemd,systemd-sysv,dbus,python3,python3-venv,procps,jq"
CACHE_DIR = Path(os.environ.get("EDGE_ROOTFS_CACHE", "/var/cache/order-edge-agent"))
ROOTFS = CACHE_DIR / (f"rootfs-{SUITE}-" + hashlib.sha256(INCLUDE.encode()).hexdigest()[:10])
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg: str) -> None:
    print(f"[systemd_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_host_tools() -> None:
    """systemd-nspawn and debootstrap on the host (CI: a clean Debian 12, as root)."""
    if shutil.which("systemd-nspawn") and shutil.which("debootstrap"):
        return
    log("installing systemd-container and debootstrap with apt-get")
    host_tools.ensure({"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"})


def debian_mirror() -> str:
    """The host's Debian mirror: the first URIs: of debian.sources (deb822), else sources.list."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def rootfs() -> Path:
    """The cached root filesystem, built (under a lock, into a temp dir renamed into place
    when complete) if it is missing. A half-built tree is never used."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (ROOTFS / "usr/lib/systemd/systemd").exists():
            return ROOTFS
        for stale in CACHE_DIR.glob(ROOTFS.name + ".tmp.*"):  # a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        ensure_host_tools()
        tmp = Path(tempfile.mkdtemp(prefix=ROOTFS.name + ".tmp.", dir=CACHE_DIR))
        try:
            mirror = debian_mirror()
            log(f"debootstrap {SUITE} from {mirror} into {tmp} (once; cached in {ROOTFS})")
            start = time.monotonic()
            proc = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={INCLUDE}",
                    SUITE,
                    str(tmp / "root"),
                    mirror,
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"debootstrap failed ({proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                )
            log(f"debootstrap took {time.monotonic() - start:.0f} s")
            (tmp / "root").rename(ROOTFS)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return ROOTFS


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(5):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def find_pid1(nspawn_pid: int) -> int:
    """Host PID of the container's PID 1: a process below nspawn that is PID 1 in its own
    PID namespace (the last NSpid field), or 0."""
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            nspid = next(
                line for line in status.read_text().splitlines() if line.startswith("NSpid:")
            ).split()[1:]
            if len(nspid) >= 2 and nspid[-1] == "1" and _descends_from(int(nspid[0]), nspawn_pid):
                return int(nspid[0])
    return 0


class Container:
    """One booted container. Use as a context manager: teardown always powers it off."""

    def __init__(self, root: Path, name: str, binds_ro: dict[str, str], logfile: Path):
        self.root, self.name, self.binds_ro, self.logfile = root, name, binds_ro, logfile
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # -- lifecycle ------------------------------------------------------------------
    def boot(self, timeout: float = 60) -> None:
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "-b",
            "-D",
            str(self.root),
            "--volatile=overlay",
            "-M",
            self.name,
            "--register=no",
            "--keep-unit",
            "--console=read-only",
        ]
        cmd += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro.items()]
        log(" ".join(cmd))
        with open(self.logfile, "wb") as out:
            self.nspawn = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(
                    f"systemd-nspawn exited {self.nspawn.returncode}:\n"
                    + self.logfile.read_text(errors="replace")[-3000:]
                )
            self.pid1 = self.pid1 or find_pid1(self.nspawn.pid)
            if self.pid1 and Path(f"/proc/{self.pid1}/root/run/systemd/private").exists():
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"container {self.name}: no systemd manager after {timeout} s")
        # Wait for boot to finish (running or degraded both mean "startup done").
        out = self.sh(
            "systemctl is-system-running --wait",
            check=False,
            timeout=max(5.0, deadline - time.monotonic()),
        ).stdout.strip()
        log(f"container {self.name} booted: PID 1 is host PID {self.pid1}, state {out}")

    def poweroff(self, timeout: float = 30) -> None:
        """SIGRTMIN+4 to the container's systemd (poweroff); past the deadline, SIGKILL to
        its PID 1 (which takes the whole PID namespace with it) and to nspawn."""
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None:
            self.pid1 = self.pid1 or find_pid1(self.nspawn.pid)
        if self.nspawn.poll() is None and self.pid1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGRTMIN + 4)
            try:
                self.nspawn.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"container {self.name} did not power off in {timeout} s: SIGKILL")
        if self.nspawn.poll() is None:
            for pid in (self.pid1, self.nspawn.pid):
                with contextlib.suppress(ProcessLookupError):
                    if pid:
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(timeout=10)
        log(f"container {self.name} is down (nspawn exit {self.nspawn.returncode})")

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.poweroff()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    # -- commands inside --------------------------------------------------------------
    def sh(
        self,
        script: str,
        *,
        check: bool = True,
        timeout: float = 60,
        cwd: str = "/",
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command line inside the container (as root, clean environment)."""
        assert self.pid1, "container not booted"
        envs = {
            "PATH": PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
            **(env or {}),
        }
        cmd = [
            "nsenter",
            "-t",
            str(self.pid1),
            "-a",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in envs.items()),
            "sh",
            "-c",
            f"cd {shlex.quote(cwd)} && {script}",
        ]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in container: {script!r} exited {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-3000:]}\n"
                f"--- stderr ---\n{proc.stderr[-3000:]}"
            )
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(
            f"systemctl show {shlex.quote(unit)} " + " ".join(f"-p {p}" for p in props)
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.sh(f"cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}", input=text)


NAME_PREFIX = "edge-agent-ct-"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def reap_leftovers() -> None:
    """Containers of earlier runs whose test process is gone (killed with SIGKILL, so no
    teardown ran): power them off, by PID, with a deadline."""
    for proc in Path("/proc").glob("[0-9]*"):
        argv = _cmdline(int(proc.name))
        if not argv or not argv[0].endswith("systemd-nspawn") or "-M" not in argv:
            continue
        name = argv[argv.index("-M") + 1] if argv.index("-M") + 1 < len(argv) else ""
        owner = name.removeprefix(NAME_PREFIX)
        if not name.startswith(NAME_PREFIX) or not owner.isdigit():
            continue
        if Path(f"/proc/{owner}").exists() and "pytest" in " ".join(_cmdline(int(owner))):
            continue  # its test run is alive
        log(f"leftover container {name} (nspawn PID {proc.name}): powering it off")
        _stop_pids(find_pid1(int(proc.name)), int(proc.name), timeout=30)


def _stop_pids(pid1: int, nspawn_pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        if pid1:
            os.kill(pid1, signal.SIGRTMIN + 4)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{nspawn_pid}").exists():
        time.sleep(0.2)
    for pid in (pid1, nspawn_pid):
        with contextlib.suppress(ProcessLookupError):
            if pid and Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def booted(binds_ro: dict[str, str], logfile: Path) -> Iterator[Container]:
    reap_leftovers()
    with Container(rootfs(), f"{NAME_PREFIX}{os.getpid()}", binds_ro, logfile) as c:
        yield c
