"""``edge-agent check-config``: keys, directories, secrets, DNS; exit 0/2; writes nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from agent.drill.sandbox import PRIMARY_NAME, STANDBY_NAME, Sandbox
from tests.support.harness import AS_NOBODY, edge_agent, into_a_closed_pipe, write_config


def check(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return edge_agent("check-config", *(["--config", str(config)] if config else []), *args)


async def acheck(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """In a thread: the sandbox's DNS answers from this test's event loop."""
    return await asyncio.to_thread(check, *args, config=config)


def sandbox_config(tmp_path: Path, sandbox: Sandbox, **sections: dict[str, object]) -> Path:
    return write_config(
        tmp_path,
        sandbox.primary_url,
        upstream={"standby": sandbox.standby_url, "nameservers": [sandbox.dns.nameserver]},
        **sections,
    )


def tree(*roots: Path) -> list[tuple[str, int, float]]:
    """Every path below ``roots`` with its mode and mtime: what a write would change."""
    seen = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames, "."]:
                st = os.lstat(os.path.join(dirpath, name))
                seen.append((os.path.join(dirpath, name), st.st_mode, st.st_mtime))
    return sorted(seen)


async def test_a_good_config_passes_and_prints_every_key(tmp_path: Path, sandbox: Sandbox):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token-1\n")
    config = sandbox_config(tmp_path, sandbox, auth={"tokens_file": str(tokens)})
    done = await acheck(config=config)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for key in (
        "agent.node_id",
        "agent.keepalive_timeout_s",
        "buffer.drain_to_standby",
        "upstream.nameservers",
        "health.healthy_threshold",
        "sms.concurrency",
        "auth.tokens_file",
        "log.level",
        "chain.enabled",
    ):
        assert f"\n{key} = " in out, key
    assert f'upstream.primary = "{sandbox.primary_url}"' in out
    assert "auth.tokens = <set>" in out
    assert "s3cret" not in out + done.stderr  # a secret is never printed
    assert "OK (0 errors, 0 warnings" in done.stderr
    # The directories do not exist yet: the check may not create them.
    assert not (tmp_path / "state").exists() and not (tmp_path / "spool").exists()


def test_a_bad_key_is_one_line_exit_2(tmp_path: Path):
    config = write_config(tmp_path, "http://127.0.0.1:1/v3", log={"level": "verbose"})
    done = check(config=config)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"edge-agent: config error: {config}: log.level must be one of debug, info, "
        "warning, error, got 'verbose'"
    ]


async def test_an_unknown_host_is_an_error_a_silent_dns_a_warning(tmp_path: Path, sandbox: Sandbox):
    config = sandbox_config(tmp_path, sandbox)
    del sandbox.dns.records[STANDBY_NAME]  # NXDOMAIN: a typo or a record never made
    done = await acheck(config=config)
    assert done.returncode == 2
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f'error: upstream.standby = "{sandbox.standby_url}": ')
    assert "NXDOMAIN" in line and STANDBY_NAME in line
    assert PRIMARY_NAME not in done.stderr  # the primary resolved
    sandbox.dns.mode = "silent"  # DNS down right now: the agent will keep trying
    done = await acheck(config=config)
    assert done.returncode == 0, done.stderr
    warnings = [x for x in done.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 2 and all("timeout" in w for w in warnings), warnings


async def test_an_unreadable_sms_secret_names_the_key(tmp_path: Path, sandbox: Sandbox):
    missing = tmp_path / "no-such-sms-secret"
    config = sandbox_config(
        tmp_path, sandbox, sms={"provider": "http", "credentials_file": str(missing)}
    )
    done = await acheck(config=config)
    assert done.returncode == 2
    assert f'error: sms.credentials_file = "{missing}": cannot read SMS credentials' in (
        done.stderr
    )


def test_it_writes_nothing_into_existing_directories(tmp_path: Path):
    config = write_config(tmp_path, "http://127.0.0.1:1/v3")
    for sub in ("state", "spool/pending", "spool/inbox", "spool/merged", "spool/rejected"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "spool" / "pending" / "WH-1.json").write_text("{}")
    before = tree(tmp_path / "state", tmp_path / "spool")
    done = check(config=config)
    assert done.returncode == 0, done.stderr
    assert tree(tmp_path / "state", tmp_path / "spool") == before


def test_directories_are_checked_for_the_service_user(shared_dir: Path):
    """As root with --user: owner and mode bits, as that user would meet them."""
    state, spool = shared_dir / "state", shared_dir / "spool"
    state.mkdir(mode=0o700)
    (spool / "pending").mkdir(mode=0o700, parents=True)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(state), str(spool)], check=True)
    config = write_config(shared_dir, "http://127.0.0.1:1/v3")
    assert check("--user", "nobody", config=config).returncode == 0
    # A run as root left its database behind: the service user cannot open it.
    journal = state / "journal.sqlite3"
    journal.write_text("")
    os.chmod(journal, 0o600)
    # ... and took pending/ for itself.
    os.chown(spool / "pending", 0, 0)
    done = check("--user", "nobody", config=config)
    assert done.returncode == 2
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 2, done.stderr
    assert errors[0].startswith(f'error: agent.state_dir = "{state}": {journal} (root:root 0600)')
    assert f"chown nobody {journal}" in errors[0]
    assert errors[1].startswith(f'error: buffer.path = "{spool / "pending"}": user nobody cannot')
    assert "directories checked for user nobody" in done.stderr
    # The same directories for root (no --user: the caller, by os.access) are fine.
    assert check(config=config).returncode == 0


def test_a_directory_the_user_cannot_create(shared_dir: Path):
    closed = shared_dir / "closed"
    closed.mkdir(mode=0o755)  # root's: nobody cannot create anything in it
    config = write_config(
        shared_dir, "http://127.0.0.1:1/v3", buffer={"path": str(closed / "spool")}
    )
    done = check("--user", "nobody", config=config)
    # As the service user it is a warning: systemd's tmpfiles/StateDirectory= may create it.
    assert done.returncode == 0
    assert f'warning: buffer.path = "{closed / "spool"}": does not exist' in done.stderr
    # For the user running the check (here nobody itself), it is an error.
    os.chmod(config, 0o644)
    as_nobody = edge_agent("check-config", "--config", str(config), prefix=AS_NOBODY)
    assert as_nobody.returncode == 2, as_nobody.stderr
    assert f'error: buffer.path = "{closed / "spool"}": does not exist, and user nobody ' in (
        as_nobody.stderr
    )
    assert "install -d -o nobody -m 0700" in as_nobody.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [(("--help",), "usage: edge-agent check-config"), (("--frob",), "unrecognized arguments")],
)
def test_help_and_unknown_options(args: tuple[str, ...], needle: str):
    done = check(*args)
    assert needle in done.stdout + done.stderr
    assert done.returncode == (0 if args == ("--help",) else 2)
    if done.returncode == 2:
        assert len(done.stderr.strip().splitlines()) == 1


def test_an_unknown_service_user_is_a_usage_error(tmp_path: Path):
    config = write_config(tmp_path, "http://127.0.0.1:1/v3")
    done = check("--user", "no-such-user-xyz", config=config)
    assert done.returncode == 2
    assert done.stderr.strip() == "edge-agent: --user no-such-user-xyz: no such user on this host"


def test_into_a_closed_pipe_it_ends_quietly(tmp_path: Path):
    """``edge-agent check-config | head -0``."""
    config = write_config(tmp_path, "http://127.0.0.1:1/v3")
    done = into_a_closed_pipe("check-config", "--config", str(config))
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141
