"""One chain step: ask a downstream system whether it has an order, and repair if asked.

Two kinds, one interface (``StepCheck``):

- ``HttpStep``: ``check`` = "METHOD URL-template"; a 200 (any 2xx) answer
  must hold ``present`` (a JSON pointer) or every ``equal`` pointer with the
  expected value (exact decimals, ``compare.py``). ``repair`` re-pushes.
- a Python class (``kind = "module:Class"`` or an entry point name in the
  group ``order_edge_agent.chain_steps``), for systems reached through an SDK.
  Its interface, which ``PluginStep`` adapts::

      class MyStep:
          def __init__(self) -> None: ...          # no arguments; read your own config
          async def check(self, order: ChainOrder) -> CheckResult: ...
          async def repair(self, order: ChainOrder) -> None: ...   # optional

  ``CheckResult(Outcome.VERIFIED | PENDING | FAILED | RETRY, "what was seen")``.
  An exception from ``check`` counts as RETRY (a downstream outage), never FAILED.

What an answer means (CONTRACT 10): 2xx judged by the body; 404/408/429 not yet
(PENDING); another 4xx FAILED; 5xx, timeouts and refused connections RETRY,
never failed. A bearer token goes in the Authorization header and nowhere else:
no detail or log line carries a header.
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from agent.base.template import Absent, Values, load_json, pointer_text, resolve
from agent.chain.compare import same_value, shown
from agent.config import ChainStep, Request
from agent.errors import ConfigError

log = logging.getLogger("agent.chain")
ENTRY_POINT_GROUP = "order_edge_agent.chain_steps"
NOT_YET = frozenset({404, 408, 429})
SNIPPET = 200


class Outcome(enum.Enum):
    VERIFIED = "verified"
    PENDING = "pending"  # not there yet: check again at the next recheck (and repair)
    FAILED = "failed"  # there, but wrong (or refused for good): reported, rechecked
    RETRY = "retry"  # the system did not answer usefully: nothing learnt


@dataclass(frozen=True)
class CheckResult:
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True)
class ChainOrder:
    """What a step knows of an outage order: the record's facts and its raw body."""

    serial: str
    order_id: str | None
    dedupe_key: str
    channel_id: str | None
    channel_order_id: str | None
    received_at: str
    body: str | None  # the raw order text, None when it is not known (rebuilt ledger)

    def values(self) -> Values:
        doc = None
        if self.body is not None:
            try:
                doc = load_json(self.body)
            except ValueError:
                doc = None
        return Values(
            {
                "order_id": self.order_id,
                "serial": self.serial,
                "dedupe_key": self.dedupe_key,
                "channel_id": self.channel_id,
                "channel_order_id": self.channel_order_id,
                "received_at": self.received_at,
            },
            doc,
        )


class StepCheck(Protocol):
    name: str
    can_repair: bool

    async def check(self, order: ChainOrder) -> CheckResult: ...

    async def repair(self, order: ChainOrder) -> None: ...


class HttpStep:
    def __init__(self, step: ChainStep, session: aiohttp.ClientSession) -> None:
        if step.check is None:
            raise ValueError(f"chain step {step.name} has no check request")
        self.name = step.name
        self.can_repair = step.repair is not None
        self._step = step
        self._check = step.check
        self._session = session
        self._headers = {"Accept": "application/json"}
        if step.token:
            self._headers["Authorization"] = f"Bearer {step.token}"

    async def check(self, order: ChainOrder) -> CheckResult:
        values = order.values()
        try:
            url = self._check.url.url(values)
        except Absent as exc:
            return CheckResult(Outcome.FAILED, f"cannot build the check: {exc}")
        try:
            async with self._session.request(self._check.method, url, headers=self._headers) as r:
                status, data = r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return CheckResult(
                Outcome.RETRY, f"{self._check.method} {url}: {type(exc).__name__} {exc}".strip()
            )
        where = f"{self._check.method} {url}: HTTP {status}"
        if 200 <= status < 300:
            return self._judge(data, values, where)
        if status in NOT_YET:
            return CheckResult(Outcome.PENDING, where)
        if 400 <= status < 500:
            return CheckResult(Outcome.FAILED, f"{where} {_snippet(data)}".rstrip())
        return CheckResult(Outcome.RETRY, where)

    def _judge(self, data: bytes, values: Values, where: str) -> CheckResult:
        try:
            doc = load_json(data)
        except ValueError:
            return CheckResult(Outcome.PENDING, f"{where}, but the answer is not JSON")
        step = self._step
        if step.present is not None:
            try:
                resolve(doc, step.present)
            except Absent:
                return CheckResult(
                    Outcome.PENDING, f"{where}, no {pointer_text(step.present)} in the answer"
                )
        seen = []
        for pointer, template in step.equal:
            try:
                expected = template.render(values, str)
            except Absent as exc:
                return CheckResult(Outcome.FAILED, f"cannot build the expected value: {exc}")
            try:
                got = resolve(doc, pointer)
            except Absent:
                return CheckResult(
                    Outcome.PENDING, f"{where}, no {pointer_text(pointer)} in the answer"
                )
            if not same_value(got, expected):
                return CheckResult(
                    Outcome.FAILED,
                    f"{pointer_text(pointer)} is {shown(got)} downstream, "
                    f"expected {shown(expected)}",
                )
            seen.append(f"{pointer_text(pointer)} = {shown(got)}")
        return CheckResult(Outcome.VERIFIED, "; ".join(seen))

    async def repair(self, order: ChainOrder) -> None:
        repair = self._step.repair
        if repair is None:
            return
        values = order.values()
        try:
            url = repair.url.url(values)
            body = (
                self._step.repair_body.json_body(values)
                if self._step.repair_body is not None
                else None
            )
        except Absent as exc:
            log.warning(
                "chain step %s: cannot build the repair for %s: %s", self.name, order.serial, exc
            )
            return
        await self._send(repair, url, body, order.serial)

    async def _send(self, repair: Request, url: str, body: str | None, serial: str) -> None:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                repair.method, url, headers=headers, data=None if body is None else body.encode()
            ) as r:
                await r.read()
                log.info(
                    "chain step %s: repair for %s asked: HTTP %d",
                    self.name,
                    serial,
                    r.status,
                    extra={"serial": serial, "step": self.name},
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning(
                "chain step %s: repair for %s not asked: %s %s",
                self.name,
                serial,
                type(exc).__name__,
                exc,
            )


class PluginStep:
    """A step class from ``kind``; its exceptions are retries, never failures."""

    def __init__(self, name: str, impl: Any) -> None:
        self.name = name
        self._impl = impl
        self.can_repair = callable(getattr(impl, "repair", None))

    async def check(self, order: ChainOrder) -> CheckResult:
        try:
            result = await self._impl.check(order)
        except Exception as exc:
            return CheckResult(Outcome.RETRY, f"{type(exc).__name__}: {exc}")
        if not isinstance(result, CheckResult):
            return CheckResult(
                Outcome.RETRY, f"check() returned {type(result).__name__}, not a CheckResult"
            )
        return result

    async def repair(self, order: ChainOrder) -> None:
        if not self.can_repair:
            return
        try:
            await self._impl.repair(order)
        except Exception as exc:
            log.warning(
                "chain step %s: repair for %s failed: %s: %s",
                self.name,
                order.serial,
                type(exc).__name__,
                exc,
            )


def load_plugin(step: ChainStep) -> PluginStep:
    """Import the class ``kind`` names and make one instance; ConfigError if it cannot."""
    kind = step.kind
    try:
        if ":" in kind:
            module, _, attr = kind.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=kind)
            if not found:
                raise LookupError(f"no entry point {kind!r} in group {ENTRY_POINT_GROUP}")
            cls = next(iter(found)).load()
        impl = cls()
    except Exception as exc:
        raise ConfigError(
            f"chain step {step.name}: cannot load kind {kind!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(getattr(impl, "check", None)):
        raise ConfigError(f"chain step {step.name}: {kind!r} has no check(order) method")
    return PluginStep(step.name, impl)


def load_plugins(steps: tuple[ChainStep, ...]) -> dict[str, PluginStep]:
    """Every ``kind`` step, loaded at construction so a bad one fails the start (exit 2)."""
    return {s.name: load_plugin(s) for s in steps if s.kind}


def build_steps(
    steps: tuple[ChainStep, ...], session: aiohttp.ClientSession, plugins: dict[str, PluginStep]
) -> list[StepCheck]:
    return [plugins[s.name] if s.kind else HttpStep(s, session) for s in steps]


def _snippet(data: bytes) -> str:
    text = data[:SNIPPET].decode("utf-8", "replace").strip()
    return f"({text})" if text else ""
