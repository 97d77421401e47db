"""Configuration: parsed and validated once, at load, into frozen dataclasses.

Every key has a default except ``upstream.primary``. Unknown keys, wrong
types and bad values raise :class:`ConfigError` naming ``section.key``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import string
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.base.template import Template, TemplateError, parse_pointer
from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/edge-agent/agent.toml"
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")


def _default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()).strip("-")[:32]
    return name or "edge"


@dataclass(frozen=True)
class AgentSection:
    node_id: str = field(default_factory=_default_node_id)
    listen: str = "127.0.0.1:8470"
    state_dir: str = "/var/lib/edge-agent"
    max_body_bytes: int = 1_048_576
    journal_retention_days: float = 30.0
    shutdown_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # A request head (request line and headers) must arrive whole within this of the
    # connection opening or its first byte; an idle keep-alive connection is closed
    # after keepalive_timeout_s. Both bound the descriptors idle clients can hold.
    head_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True)
class BufferSection:
    path: str = "/var/spool/edge-agent"
    scan_interval_s: float = 30.0
    max_bytes: int = 2_147_483_648
    drain_rate_per_s: float = 200.0
    drain_concurrency: int = 16
    retention_days: float = 7.0
    drain_to_standby: bool = True


@dataclass(frozen=True)
class UpstreamSection:
    primary: str = ""
    standby: str = ""
    timeout_s: float = 5.0
    nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthSection:
    interval_s: float = 1.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2


@dataclass(frozen=True)
class SmsSection:
    enabled: bool = True
    provider: str = "http"
    url: str = "https://sms.example.internal/send"
    sign_name: str = "搭贝"
    template: str = "【{sign_name}】您的订单已受理,单号{SN},预计2小时内同步至小程序"
    per_phone_per_hour: int = 3
    template_code: str = ""  # aliyun: the approved template's code, e.g. SMS_123456789
    endpoint: str = "https://dysmsapi.aliyuncs.com"  # aliyun
    credentials_file: str = ""  # http: bearer token; aliyun: access_key_id/access_key_secret
    timeout_s: float = 5.0
    give_up_after_s: float = 3600.0
    retry_initial_s: float = 2.0
    retry_max_s: float = 300.0
    rate_limited_pause_s: float = 60.0
    concurrency: int = 4


@dataclass(frozen=True)
class AuthSection:
    tokens_file: str = "/etc/edge-agent/tokens"


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogSection:
    level: str = "info"  # one of LOG_LEVELS; reloaded live


CHAIN_METHODS = ("GET", "POST", "PUT", "PATCH")
_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# "module:Class", or an entry point name (letters, digits, '_', '.', '-').
_STEP_KIND = re.compile(r"^([A-Za-z_][\w.]*:[A-Za-z_]\w*|[\w][\w.-]*)$")


@dataclass(frozen=True)
class Request:
    """``"METHOD URL-template"``, compiled once: the URL's placeholders are URL-encoded."""

    method: str
    url: Template


@dataclass(frozen=True)
class ChainStep:
    """One ``[[chain.step]]``: an HTTP check (``check`` + ``present``/``equal``, optional
    ``repair``) or a Python class (``kind``, CONTRACT 10)."""

    name: str
    check: Request | None = None
    present: tuple[str, ...] | None = None  # JSON pointer that must exist in the answer
    equal: tuple[tuple[tuple[str, ...], Template], ...] = ()  # pointer -> expected value
    repair: Request | None = None
    repair_body: Template | None = None  # JSON-escaped placeholders
    token_file: str = ""
    kind: str = ""  # "module:Class" or an entry point name in order_edge_agent.chain_steps
    token: str = field(default="", repr=False)  # secret, read at load


@dataclass(frozen=True)
class ChainSection:
    enabled: bool = False
    deadline_h: float = 24.0
    recheck_interval_s: float = 300.0
    concurrency: int = 8  # checks in flight at once: what a real ERP tolerates
    timeout_s: float = 10.0
    steps: tuple[ChainStep, ...] = ()

    @property
    def deadline_s(self) -> float:
        return self.deadline_h * 3600.0


@dataclass(frozen=True)
class ReplicationSection:
    """The buffer replicated through NATS JetStream (CONTRACT 11); off unless enabled."""

    enabled: bool = False
    servers: tuple[str, ...] = ()
    replicas: int = 3  # the stream's replica count (quorum = replicas // 2 + 1)
    required: bool = True  # no 202 for an order JetStream did not acknowledge
    credentials_file: str = ""  # a NATS .creds file, read like the other secrets
    timeout_s: float = 2.0


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    buffer: BufferSection = field(default_factory=BufferSection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    health: HealthSection = field(default_factory=HealthSection)
    sms: SmsSection = field(default_factory=SmsSection)
    auth: AuthSection = field(default_factory=AuthSection)
    chain: ChainSection = field(default_factory=ChainSection)
    log: LogSection = field(default_factory=LogSection)
    replication: ReplicationSection = field(default_factory=ReplicationSection)
    source: str = "<defaults>"
    # Secrets: loaded at load time, never printed.
    tokens: frozenset[str] = field(default=frozenset(), repr=False)


_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentSection,
    "buffer": BufferSection,
    "upstream": UpstreamSection,
    "health": HealthSection,
    "sms": SmsSection,
    "auth": AuthSection,
    "log": LogSection,
    "replication": ReplicationSection,
}


def resolve_config_path(arg: str | None) -> str:
    """--config, else $EDGE_AGENT_CONFIG, else the system path."""
    return arg or os.environ.get("EDGE_AGENT_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(path: str, tokens: bool = True) -> Config:
    """Read, parse and validate ``path``; every failure is a ConfigError.

    ``tokens``: also read the bearer tokens (the daemon); edge-recover serves no API
    and is never handed them.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}; pass --config PATH"
        ) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return parse_config(data, source=path, tokens=tokens)


def parse_config(data: dict[str, Any], source: str = "<memory>", tokens: bool = True) -> Config:
    for name in data:
        if name not in _SECTIONS and name != "chain":
            raise ConfigError(f"{source}: unknown section [{name}]")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        sections[name] = _build(cls, table, name, source)
    chain = data.get("chain", {})
    if not isinstance(chain, dict):
        raise ConfigError(f"{source}: [chain] must be a table")
    cfg = Config(**sections, chain=parse_chain(chain, source), source=source)
    _validate(cfg, source)
    if tokens:
        cfg = dataclasses.replace(cfg, tokens=load_tokens(cfg.auth.tokens_file))
        check_auth_exposure(cfg)
    return cfg


def _build(cls: type[Any], table: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {section}.{key}")
        values[key] = _coerce(value, hints[key], f"{section}.{key}", source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, got {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if typing.get_origin(hint) is tuple or isinstance(hint, types.GenericAlias):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return tuple(value)
    raise ConfigError(f"{source}: {key} has an unsupported type")  # pragma: no cover


def _check(ok: bool, source: str, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key} {message}, got {value!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(url: str, source: str, key: str, required: bool) -> None:
    if not url and not required:
        return
    parts = urlsplit(url)
    _check(
        parts.scheme in ("http", "https") and bool(parts.hostname),
        source,
        key,
        "must be an http(s) URL such as https://orders.example.internal/v3",
        url,
    )


def nameserver_address(spec: str) -> tuple[str, int]:
    """``"IP"`` or ``"IPv4:port"`` -> (IP, port); ValueError otherwise. The one parser."""
    host, sep, port = spec.rpartition(":") if spec.count(":") == 1 else ("", "", "")
    if not sep:
        host, port = spec, "53"
    ipaddress.ip_address(host)
    if not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"bad port in nameserver {spec!r}")
    return host, int(port)


def _validate(cfg: Config, source: str) -> None:
    a, b, u, h, s = cfg.agent, cfg.buffer, cfg.upstream, cfg.health, cfg.sms
    _check(
        bool(_NODE_ID.match(a.node_id)),
        source,
        "agent.node_id",
        "must be 1-32 letters, digits or '-'",
        a.node_id,
    )
    host, sep, port = a.listen.rpartition(":")
    _check(
        bool(sep and host and port.isdigit() and int(port) <= 65535),
        source,
        "agent.listen",
        "must be host:port",
        a.listen,
    )
    _check(a.max_body_bytes > 0, source, "agent.max_body_bytes", "must be > 0", a.max_body_bytes)
    _check(
        a.journal_retention_days > 0,
        source,
        "agent.journal_retention_days",
        "must be > 0",
        a.journal_retention_days,
    )
    _check(a.body_timeout_s > 0, source, "agent.body_timeout_s", "must be > 0", a.body_timeout_s)
    _check(a.head_timeout_s > 0, source, "agent.head_timeout_s", "must be > 0", a.head_timeout_s)
    _check(
        a.keepalive_timeout_s > 0,
        source,
        "agent.keepalive_timeout_s",
        "must be > 0",
        a.keepalive_timeout_s,
    )
    _check(bool(a.state_dir), source, "agent.state_dir", "must not be empty", a.state_dir)
    _check(bool(b.path), source, "buffer.path", "must not be empty", b.path)
    _check(
        b.scan_interval_s > 0, source, "buffer.scan_interval_s", "must be > 0", b.scan_interval_s
    )
    _check(b.max_bytes > 0, source, "buffer.max_bytes", "must be > 0", b.max_bytes)
    _check(
        b.drain_rate_per_s > 0, source, "buffer.drain_rate_per_s", "must be > 0", b.drain_rate_per_s
    )
    _check(
        b.drain_concurrency > 0,
        source,
        "buffer.drain_concurrency",
        "must be > 0",
        b.drain_concurrency,
    )
    _check(b.retention_days >= 0, source, "buffer.retention_days", "must be >= 0", b.retention_days)
    _check(
        bool(u.primary),
        source,
        "upstream.primary",
        "is required (the primary cluster's base URL)",
        u.primary,
    )
    _check_url(u.primary, source, "upstream.primary", required=True)
    _check_url(u.standby, source, "upstream.standby", required=False)
    _check(u.timeout_s > 0, source, "upstream.timeout_s", "must be > 0", u.timeout_s)
    for ns in u.nameservers:
        try:
            nameserver_address(ns)
            ok = True
        except ValueError:
            ok = False
        _check(ok, source, "upstream.nameservers", "entries must be IP or IP:port", ns)
    _check(
        cfg.log.level in LOG_LEVELS,
        source,
        "log.level",
        f"must be one of {', '.join(LOG_LEVELS)}",
        cfg.log.level,
    )
    _check(h.interval_s > 0, source, "health.interval_s", "must be > 0", h.interval_s)
    _check(h.timeout_s > 0, source, "health.timeout_s", "must be > 0", h.timeout_s)
    _check(
        h.unhealthy_threshold >= 1,
        source,
        "health.unhealthy_threshold",
        "must be >= 1",
        h.unhealthy_threshold,
    )
    _check(
        h.healthy_threshold >= 1,
        source,
        "health.healthy_threshold",
        "must be >= 1",
        h.healthy_threshold,
    )
    _check(
        s.provider in ("http", "aliyun", "log"),
        source,
        "sms.provider",
        "must be one of http, aliyun, log",
        s.provider,
    )
    _check(
        s.per_phone_per_hour >= 0,
        source,
        "sms.per_phone_per_hour",
        "must be >= 0",
        s.per_phone_per_hour,
    )
    try:
        names = {f[1] for f in string.Formatter().parse(s.template) if f[1] is not None}
    except ValueError as exc:
        raise ConfigError(f"{source}: sms.template is malformed: {exc}") from exc
    _check(
        names <= {"SN", "sign_name"},
        source,
        "sms.template",
        "may only use the placeholders {SN} and {sign_name}",
        s.template,
    )
    _check("SN" in names, source, "sms.template", "must contain {SN}", s.template)
    _validate_sms(s, source)
    _validate_replication(cfg.replication, source)


def _validate_replication(r: ReplicationSection, source: str) -> None:
    _check(r.timeout_s > 0, source, "replication.timeout_s", "must be > 0", r.timeout_s)
    _check(
        1 <= r.replicas <= 5,
        source,
        "replication.replicas",
        "must be 1 to 5 (JetStream's limit)",
        r.replicas,
    )
    for url in r.servers:
        parts = urlsplit(url)
        _check(
            parts.scheme in ("nats", "tls") and bool(parts.hostname),
            source,
            "replication.servers",
            "must hold nats:// or tls:// URLs such as nats://10.0.0.11:4222",
            url,
        )
    if not r.enabled:
        return
    _check(
        bool(r.servers),
        source,
        "replication.servers",
        "must name at least one nats-server when replication.enabled is true",
        list(r.servers),
    )
    if r.credentials_file:
        _check(
            os.access(r.credentials_file, os.R_OK),
            source,
            "replication.credentials_file",
            "must be a readable NATS .creds file",
            r.credentials_file,
        )


def _validate_sms(s: SmsSection, source: str) -> None:
    for key in ("timeout_s", "give_up_after_s", "retry_initial_s", "retry_max_s"):
        _check(getattr(s, key) > 0, source, f"sms.{key}", "must be > 0", getattr(s, key))
    _check(
        s.rate_limited_pause_s >= 0,
        source,
        "sms.rate_limited_pause_s",
        "must be >= 0",
        s.rate_limited_pause_s,
    )
    _check(s.concurrency >= 1, source, "sms.concurrency", "must be >= 1", s.concurrency)
    if not s.enabled:
        return
    if s.provider == "http":
        _check_url(s.url, source, "sms.url", required=True)
    if s.provider == "aliyun":
        _check_url(s.endpoint, source, "sms.endpoint", required=True)
        _check(
            bool(s.template_code.strip()),
            source,
            "sms.template_code",
            "is required for provider aliyun (the approved template's code)",
            s.template_code,
        )
        _check(
            bool(s.sign_name.strip()),
            source,
            "sms.sign_name",
            "is required for provider aliyun",
            s.sign_name,
        )


def load_tokens(tokens_file: str) -> frozenset[str]:
    """Bearer tokens, one per line; $CREDENTIALS_DIRECTORY/tokens wins when present."""
    candidates = []
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        candidates.append(Path(cred_dir) / "tokens")
    if tokens_file:
        candidates.append(Path(tokens_file))
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"cannot read tokens file {path}: {exc.strerror}; make it readable by the "
                "agent's user, pass it with systemd LoadCredential=tokens:PATH, or set "
                'auth.tokens_file = "" (no auth: loopback only)'
            ) from exc
        lines = (line.strip() for line in text.splitlines())
        return frozenset(line for line in lines if line and not line.startswith("#"))
    return frozenset()


def check_auth_exposure(cfg: Config) -> None:
    """No tokens means no auth, which is only allowed on a loopback listener."""
    if not cfg.tokens and not _is_loopback(cfg.agent.host):
        raise ConfigError(
            f"{cfg.source}: agent.listen {cfg.agent.listen!r} is not loopback but no tokens "
            f"are configured (auth.tokens_file {cfg.auth.tokens_file!r} is empty or absent); "
            "add tokens or listen on 127.0.0.1"
        )


# -- [chain] (CONTRACT 10) ----------------------------------------------------------------

_CHAIN_KEYS = {
    "enabled": bool,
    "deadline_h": float,
    "recheck_interval_s": float,
    "concurrency": int,
    "timeout_s": float,
}
_STEP_KEYS = ("name", "check", "present", "equal", "repair", "repair_body", "token_file", "kind")


def parse_chain(table: dict[str, Any], source: str) -> ChainSection:
    """``[chain]`` and its ``[[chain.step]]`` entries, every template compiled once."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "step":
            continue
        if key not in _CHAIN_KEYS:
            raise ConfigError(f"{source}: unknown key chain.{key}")
        values[key] = _coerce(value, _CHAIN_KEYS[key], f"chain.{key}", source)
    entries = table.get("step", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: chain.step must be [[chain.step]] tables, got {entries!r}")
    steps = tuple(_parse_step(entry, i, source) for i, entry in enumerate(entries))
    chain = ChainSection(**values, steps=steps)
    _check(chain.deadline_h > 0, source, "chain.deadline_h", "must be > 0", chain.deadline_h)
    _check(
        chain.recheck_interval_s > 0,
        source,
        "chain.recheck_interval_s",
        "must be > 0",
        chain.recheck_interval_s,
    )
    _check(chain.concurrency >= 1, source, "chain.concurrency", "must be >= 1", chain.concurrency)
    _check(chain.timeout_s > 0, source, "chain.timeout_s", "must be > 0", chain.timeout_s)
    names = [s.name for s in steps]
    for name in names:
        _check(names.count(name) == 1, source, "chain.step.name", "must be unique", name)
    _check(
        bool(steps) or not chain.enabled,
        source,
        "chain.step",
        "needs at least one [[chain.step]] when chain.enabled = true",
        [],
    )
    return chain


def _parse_step(entry: dict[str, Any], index: int, source: str) -> ChainStep:
    where = f"chain.step[{index}]"
    raw: dict[str, Any] = {}
    for key, value in entry.items():
        if key not in _STEP_KEYS:
            raise ConfigError(f"{source}: unknown key {where}.{key}")
        if key == "equal":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(
                    f"{source}: {where}.equal must be a table of "
                    f'pointer = "template", got {value!r}'
                )
        elif not isinstance(value, str):
            raise ConfigError(f"{source}: {where}.{key} must be a string, got {value!r}")
        raw[key] = value
    name = raw.get("name", "")
    _check(
        bool(_STEP_NAME.match(name)),
        source,
        f"{where}.name",
        "must be 1-64 letters, digits, '_', '.' or '-'",
        name,
    )
    where = f"chain.step[{index}] ({name})"
    kind = raw.get("kind", "")
    if kind:
        _check(
            bool(_STEP_KIND.match(kind)),
            source,
            f"{where}.kind",
            "must be module:Class or an entry point name",
            kind,
        )
        extra = [k for k in ("check", "present", "equal", "repair", "repair_body") if k in raw]
        _check(
            not extra,
            source,
            f"{where}.kind",
            "excludes the HTTP keys check/present/equal/repair/repair_body",
            extra,
        )
        return ChainStep(name=name, kind=kind)
    _check(
        "check" in raw,
        source,
        f"{where}.check",
        'is required ("GET https://...") unless the step has a kind',
        None,
    )
    _check(
        "present" in raw or "equal" in raw,
        source,
        f"{where}.present",
        "or .equal is required: what a 200 answer must hold",
        None,
    )
    _check(
        "repair_body" not in raw or "repair" in raw,
        source,
        f"{where}.repair_body",
        "needs a repair request",
        raw.get("repair_body"),
    )
    try:
        check = _request(raw["check"], f"{where}.check")
        repair = _request(raw["repair"], f"{where}.repair") if "repair" in raw else None
        present = parse_pointer(raw["present"]) if "present" in raw else None
        equal = tuple(
            (parse_pointer(p), Template.compile(t)) for p, t in raw.get("equal", {}).items()
        )
        body = Template.compile(raw["repair_body"]) if "repair_body" in raw else None
    except _BadKey as exc:
        raise ConfigError(f"{source}: {exc.key} {exc}") from exc
    except TemplateError as exc:
        raise ConfigError(f"{source}: {where}: {exc}") from exc
    token_file = raw.get("token_file", "")
    return ChainStep(
        name=name,
        check=check,
        present=present,
        equal=equal,
        repair=repair,
        repair_body=body,
        token_file=token_file,
        token=load_step_token(name, token_file),
    )


class _BadKey(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _request(text: str, key: str) -> Request:
    method, _, url = text.strip().partition(" ")
    if method not in CHAIN_METHODS or not url.strip():
        raise _BadKey(
            key, f'must be "METHOD URL" with METHOD one of {", ".join(CHAIN_METHODS)}, got {text!r}'
        )
    try:
        template = Template.compile(url.strip())
    except TemplateError as exc:
        raise _BadKey(key, f"{exc}, in {text!r}") from exc
    parts = urlsplit(template.sample())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _BadKey(key, f"must hold an http(s) URL, got {text!r}")
    return Request(method, template)


def load_step_token(name: str, token_file: str) -> str:
    """A step's bearer token: ``$CREDENTIALS_DIRECTORY/chain-{name}`` wins, else
    ``token_file``; "" for none. First non-comment line; never logged."""
    candidates = []
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        candidates.append((Path(cred_dir) / f"chain-{name}", False))
    if token_file:
        candidates.append((Path(token_file), True))
    for path, required in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if required:
                raise ConfigError(f"chain step {name}: token_file {path} does not exist") from None
            continue
        except OSError as exc:
            raise ConfigError(
                f"chain step {name}: cannot read token file {path}: {exc.strerror}"
            ) from exc
        lines = (line.strip() for line in text.splitlines())
        token = next((line for line in lines if line and not line.startswith("#")), "")
        if not token:
            raise ConfigError(f"chain step {name}: token file {path} holds no token")
        return token
    return ""
