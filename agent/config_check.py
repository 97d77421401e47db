"""``edge-agent check-config``: a config checked without running the agent (``nginx -t``).

The keys are validated by the one loader (``agent.config.load_config``): a bad key is
one line and exit 2, as for every command. What the loader cannot know is checked here,
read-only: the directories (exist, or can be created, and are writable by the user
that will run the agent), the secrets (readable), the cluster hosts (resolve). Then
the effective config is printed, every key with its value, secrets as ``<set>``.

Nothing is written: not a probe file, not a directory. For the user running the check,
``os.access`` answers (ACLs, read-only mounts included); for another user
(``--user edge-agent``, the unit's ``User=``) the owner, group and mode bits of the
path and of every directory above it are compared, and a read-only mount is noticed;
ACLs and the unit's own sandbox (``ReadWritePaths=``) are not evaluated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import os
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from agent.config import ChainStep, Config, load_config
from agent.errors import ConfigError, DnsError, NoSuchHost, UsageError
from agent.sms.providers import load_credentials
from agent.upstream.dns import ClusterResolver, is_ip

DNS_TIMEOUT_S = 2.0
SECRET = "<set>"
_BUFFER_DIRS = ("pending", "inbox", "merged", "rejected")


@dataclass(frozen=True)
class Problem:
    level: str  # "error" or "warning"
    key: str
    value: Any
    what: str  # what is wrong and what to do

    def line(self) -> str:
        return f"{self.level}: {self.key} = {_show(self.value)}: {self.what}"


@dataclass(frozen=True)
class User:
    """Whom the directories must serve: the caller (``os.access``) or a named user."""

    name: str
    uid: int
    gids: frozenset[int]
    caller: bool

    @classmethod
    def of(cls, name: str | None) -> User:
        uid = os.geteuid()
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = f"uid {uid}"
            return cls(name, uid, frozenset(os.getgroups()) | {os.getegid()}, caller=True)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UsageError(f"--user {name}: no such user on this host") from None
        groups = frozenset(os.getgrouplist(name, entry.pw_gid))
        return cls(name, entry.pw_uid, groups, caller=entry.pw_uid == uid)

    def may(self, path: Path, mode: int) -> bool:
        """May this user do ``mode`` (os.R_OK|W_OK|X_OK) on ``path``, reaching it too?"""
        if self.caller:
            return os.access(path, mode)
        if mode & os.W_OK and _read_only_mount(path):
            return False
        return all(self._bits(p, os.X_OK) for p in path.parents) and self._bits(path, mode)

    def _bits(self, path: Path, mode: int) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        if self.uid == 0:  # root passes mode bits (x on a file needs one x bit)
            return True
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid in self.gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & mode == mode


def check_config(path: str, user_name: str | None) -> int:
    """Exit 0 when fine (warnings allowed), 2 on any error."""
    cfg = load_config(path)  # ConfigError: one line, exit 2 (the caller prints it)
    user = User.of(user_name)
    problems = _directories(cfg, user)
    secrets, secret_problems = _secrets(cfg)
    problems += secret_problems
    problems += asyncio.run(_cluster_hosts(cfg))
    print(f"# effective config of {path} (defaults filled in, secrets shown as {SECRET})")
    for key, value in effective(cfg, secrets):
        print(f"{key} = {value}")
    sys.stdout.flush()
    for problem in problems:
        print(problem.line(), file=sys.stderr)
    errors = sum(p.level == "error" for p in problems)
    warnings = len(problems) - errors
    verdict = "OK" if not errors else "has errors: fix the lines above"
    print(
        f"edge-agent check-config: {path} {verdict} ({errors} errors, {warnings} warnings; "
        f"directories checked for user {user.name})",
        file=sys.stderr,
    )
    return 2 if errors else 0


# -- directories --------------------------------------------------------------------------


def _directories(cfg: Config, user: User) -> list[Problem]:
    problems = _directory("agent.state_dir", Path(cfg.agent.state_dir), user)
    root = Path(cfg.buffer.path)
    problems += _directory("buffer.path", root, user)
    if root.is_dir():
        for sub in _BUFFER_DIRS:
            if (root / sub).exists():  # their files are orders: not listed here
                problems += _directory("buffer.path", root / sub, user, files=False)
    return problems


def _directory(key: str, path: Path, user: User, files: bool = True) -> list[Problem]:
    value = str(path)
    if path.exists() and not path.is_dir():
        return [Problem("error", key, value, f"{path} is not a directory; point {key} elsewhere")]
    if path.is_dir():
        if not user.may(path, os.W_OK | os.X_OK):
            return [Problem("error", key, value, _cannot_write(path, user, key))]
        return _files_inside(key, path, user) if files else []
    parent = next((p for p in path.parents if p.exists()), Path("/"))
    if parent.is_dir() and user.may(parent, os.W_OK | os.X_OK):
        return []  # the agent creates it (0700) at start
    what = (
        f"does not exist, and user {user.name} cannot create it in {parent} "
        f"({_owner_and_mode(parent)}): create it (install -d -o {user.name} -m 0700 {path}) "
        f"or point {key} at a directory {user.name} may write"
    )
    if user.caller:
        return [
            Problem("error", key, value, what + " (a trial: edge-agent sandbox --write-config DIR)")
        ]
    # The unit's StateDirectory= (or tmpfiles.d) creates it at start, as root.
    return [
        Problem(
            "warning", key, value, what + "; under systemd StateDirectory=/tmpfiles.d create it"
        )
    ]


def _files_inside(key: str, directory: Path, user: User) -> list[Problem]:
    """The files in state_dir and the buffer's root, which the agent opens read-write
    (sqlite and its -wal/-shm, the lock, the running marker): a run as root leaves
    them root's, and the service user then cannot start."""
    problems = []
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        return [Problem("error", key, str(directory), f"cannot list it: {exc.strerror}")]
    for name in names:
        path = directory / name
        if path.is_file() and not user.may(path, os.R_OK | os.W_OK):
            problems.append(
                Problem(
                    "error",
                    key,
                    str(directory),
                    f"{path} ({_owner_and_mode(path)}) is not readable and writable by user "
                    f"{user.name}: chown {user.name} {path} (a run as another user left it)",
                )
            )
    return problems


def _cannot_write(path: Path, user: User, key: str) -> str:
    return (
        f"user {user.name} cannot write there ({_owner_and_mode(path)}): "
        f"chown {user.name} {path}, run the agent as its owner, or point {key} elsewhere"
    )


def _owner_and_mode(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return exc.strerror or str(exc)
    owner = f"{_name(pwd.getpwuid, st.st_uid)}:{_name(grp.getgrgid, st.st_gid)}"
    return f"{owner} {st.st_mode & 0o7777:04o}"


def _name(lookup: Any, ident: int) -> str:
    try:
        return str(lookup(ident)[0])
    except KeyError:
        return str(ident)


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# -- secrets --------------------------------------------------------------------------------


def _secrets(cfg: Config) -> tuple[dict[str, str], list[Problem]]:
    """What to print for each secret, and the secrets that cannot be read.

    Tokens and chain step tokens were read by the loader (a bad file stopped it);
    the SMS secret is read here as the agent reads it at start.
    """
    shown = {"auth.tokens": SECRET if cfg.tokens else "<none> (no auth: loopback only)"}
    problems = []
    if cfg.sms.enabled:
        try:
            creds = load_credentials(cfg.sms)
        except ConfigError as exc:
            problems.append(
                Problem("error", "sms.credentials_file", cfg.sms.credentials_file, str(exc))
            )
            shown["sms.credentials"] = "<unreadable>"
        else:
            has = creds.token or creds.access_key_secret
            shown["sms.credentials"] = SECRET if has else "<none>"
    return shown, problems


# -- DNS ------------------------------------------------------------------------------------


async def _cluster_hosts(cfg: Config) -> list[Problem]:
    """Each cluster host through the agent's own resolver: NXDOMAIN is an error (a typo
    or a missing record), a timeout or SERVFAIL a warning (DNS may be down now)."""
    resolver = ClusterResolver(cfg.upstream.nameservers, DNS_TIMEOUT_S)
    clusters = {"upstream.primary": cfg.upstream.primary, "upstream.standby": cfg.upstream.standby}
    problems = []
    for key, url in clusters.items():
        host = urlsplit(url).hostname or ""
        if not url or is_ip(host):
            continue
        try:
            await resolver.addresses(host)
        except NoSuchHost as exc:
            problems.append(
                Problem("error", key, url, f"{exc}: fix the host name or create its DNS record")
            )
        except DnsError as exc:
            problems.append(
                Problem("warning", key, url, f"{exc}; the agent starts anyway and keeps trying")
            )
    await resolver.close()
    return problems


# -- the effective config -------------------------------------------------------------------


def effective(cfg: Config, secrets: dict[str, str]) -> list[tuple[str, str]]:
    """(key, value) for every key, in the file's order; secrets replaced."""
    rows: list[tuple[str, str]] = []
    for section in ("agent", "buffer", "upstream", "health", "sms", "auth", "log"):
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            rows.append((f"{section}.{f.name}", _show(getattr(values, f.name))))
        rows += [(k, v) for k, v in secrets.items() if k.startswith(f"{section}.")]
    chain = cfg.chain
    for f in dataclasses.fields(chain):
        if f.name != "steps":
            rows.append((f"chain.{f.name}", _show(getattr(chain, f.name))))
    for i, step in enumerate(chain.steps):
        rows += [(f"chain.step[{i}].{k}", v) for k, v in _step(step)]
    return rows


def _step(step: ChainStep) -> list[tuple[str, str]]:
    rows = [("name", _show(step.name))]
    if step.kind:
        return [*rows, ("kind", _show(step.kind))]
    if step.check is not None:
        rows.append(("check", _show(f"{step.check.method} {step.check.url.text}")))
    if step.present is not None:
        rows.append(("present", _show(_pointer(step.present))))
    for pointer, template in step.equal:
        rows.append((f"equal.{_pointer(pointer)}", _show(template.text)))
    if step.repair is not None:
        rows.append(("repair", _show(f"{step.repair.method} {step.repair.url.text}")))
    if step.repair_body is not None:
        rows.append(("repair_body", _show(step.repair_body.text)))
    rows.append(("token_file", _show(step.token_file)))
    rows.append(("token", SECRET if step.token else "<none>"))
    return rows


def _pointer(tokens: tuple[str, ...]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _show(value: Any) -> str:
    """A TOML-like value: strings quoted, lists as arrays (JSON's forms are TOML's)."""
    return orjson.dumps(value).decode()
