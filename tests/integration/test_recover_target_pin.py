"""edge-recover pins an unclear order to the target it tried, even one it cannot name (issue 19.1).

The defect: ``edge-recover --target <the standby's URL>`` without ``--config`` (or with
the URL spelled differently from ``upstream.standby``) could not say which cluster the
target was, so an unclear answer (the standby created the order, then answered 500)
left the file ``pinned_to: null``; the agent later drained it to the primary: created
at both clusters, which keep separate idempotency stores here as in production.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.integration.test_pinning import once_across
from tests.support.fakes import FakeCenter
from tests.support.harness import wait_for
from tests.support.recover_helpers import Recover, kill_when, record, recover, write_pending

HEALTH = {"interval_s": 0.1, "timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 1}
KEY = "douyin:tp-1"


def pin_of(root: Path, name: str) -> object:
    return orjson.loads((root / "pending" / name).read_bytes())["pinned_to"]


async def _merge_cut_after_unclear(root: Path, target: str, standby: FakeCenter) -> None:
    """The standby creates, answers 500 to every send; edge-recover is killed after its
    second send (the first answer's pin, if any, is durable by then)."""
    standby.after_create.extend([500] * 50)
    proc = await Recover(
        "--path", str(root), "--mode", "merge", "--target", target, "--batch", "1"
    ).start()
    await kill_when(proc, lambda: standby.sends()[KEY] >= 2, 9, "a second send")
    await proc.finish()
    standby.after_create.clear()
    assert standby.creates[KEY] == 1


async def test_an_unnamed_target_is_pinned_by_its_url_and_the_agent_never_sends_elsewhere(
    tmp_path: Path, make_agent, center: FakeCenter, standby: FakeCenter
) -> None:
    root = tmp_path / "spool"
    rec = record("tp-1", 1)
    write_pending(root, [rec])
    await _merge_cut_after_unclear(root, standby.url, standby)  # no --config at all
    assert pin_of(root, rec.filename) == standby.url  # the URL it tried, normalised

    # The agent knows the standby under another spelling (a name, not the address): it
    # cannot prove that URL is its standby, so it sends the order nowhere.
    agent = await make_agent(
        center.url,
        upstream={"standby": f"http://localhost:{standby.port}/v3", "timeout_s": 1.0},
        health=HEALTH,
    )
    passes = agent.service.drainer.passes
    await wait_for(lambda: agent.service.drainer.passes >= passes + 3, 10, "drain passes")
    assert center.sends()[KEY] == 0
    assert agent.files("pending") == [rec.filename]
    status, found = await agent.get(f"/v1/orders/{rec.serial}")
    assert (status, found["state"], found["pinned_to"]) == (200, "buffered", standby.url)
    assert (await agent.get("/status"))[1]["pinned"]["other"] == 1

    # Rerun with the same target spelled otherwise (case, trailing slash): it is the same
    # target, so the order goes there, beside the running agent, and only there.
    spelled = standby.url.replace("http://", "HTTP://") + "/"
    run = await recover("--path", str(root), "--mode", "merge", "--target", spelled)
    assert run.code == 0, run.err
    assert once_across(center, standby, {KEY}) == {KEY: "standby"}
    assert sorted(p.name for p in (root / "merged").glob("*.json")) == [rec.filename]


async def test_a_target_that_names_no_configured_cluster_is_not_sent_orders_pinned_elsewhere(
    tmp_path: Path, center: FakeCenter, standby: FakeCenter
) -> None:
    root = tmp_path / "spool"
    rec = record("tp-1", 1)
    write_pending(root, [rec.pinned(standby.url)])
    run = await recover("--path", str(root), "--mode", "merge", "--target", center.url)
    assert run.code == 1, run.err  # an order left unmerged: listed, exit 1
    assert center.sends()[KEY] == 0 and standby.sends()[KEY] == 0
    assert f"pinned to {standby.url}" in run.out
    assert f"--target {standby.url}" in run.out  # the command that delivers it


async def test_the_agent_drains_a_url_pin_to_the_cluster_configured_at_that_url(
    tmp_path: Path, make_agent, center: FakeCenter, standby: FakeCenter
) -> None:
    root = tmp_path / "spool"
    rec = record("tp-1", 1)
    write_pending(root, [rec.pinned(standby.url)])
    agent = await make_agent(
        center.url, upstream={"standby": standby.url + "/", "timeout_s": 1.0}, health=HEALTH
    )
    await wait_for(lambda: agent.files("pending") == [], 10, "the drain to the standby")
    assert once_across(center, standby, {KEY}) == {KEY: "standby"}
    assert center.sends()[KEY] == 0


async def test_a_loose_raw_order_that_got_an_unclear_answer_is_pinned_too(
    tmp_path: Path, center: FakeCenter, standby: FakeCenter
) -> None:
    """A raw order object (no record around it) left in DIR by another tool: once the
    target may hold it, the file becomes a record pinned there, its body verbatim."""
    root = tmp_path / "outage"
    root.mkdir()
    raw = b'{"channel_id": "douyin", "channel_order_id": "tp-1", "amount": "199.10"}'
    (root / "from-pos.json").write_bytes(raw)
    await _merge_cut_after_unclear(root, standby.url, standby)
    doc = orjson.loads((root / "from-pos.json").read_bytes())
    assert (doc["pinned_to"], doc["body"], doc["dedupe_key"]) == (standby.url, raw.decode(), KEY)
    run = await recover("--path", str(root), "--mode", "merge", "--target", center.url)
    assert run.code == 1 and center.sends()[KEY] == 0, run.out
    run = await recover("--path", str(root), "--mode", "merge", "--target", standby.url)
    assert run.code == 0, run.err
    assert once_across(center, standby, {KEY}) == {KEY: "standby"}


async def test_an_unclear_answer_through_a_symlink_pins_the_order_it_points_to(
    tmp_path: Path, center: FakeCenter, standby: FakeCenter
) -> None:
    """Ops gathered the agent's pending file into DIR with ``ln -s``: the pin must land in
    the file itself, or the agent's drain would later send it to the primary."""
    agent_buffer = tmp_path / "spool"
    rec = record("tp-1", 1)
    write_pending(agent_buffer, [rec])
    outage = tmp_path / "outage"
    outage.mkdir()
    (outage / rec.filename).symlink_to(agent_buffer / "pending" / rec.filename)
    await _merge_cut_after_unclear(outage, standby.url, standby)
    assert pin_of(agent_buffer, rec.filename) == standby.url
    assert (outage / rec.filename).is_symlink()  # the link was not replaced by a copy
