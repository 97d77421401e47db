"""The aliyun provider: Dysms SendSms with an ACS3-HMAC-SHA256 signature, against a fake
endpoint that recomputes the signature from the received request (tests/support/fakes.py)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.sms.aliyun_sign import AccessKey, sign_request
from tests.support.fakes import FakeAliyun, FakeCenter, aliyun_expected_signature
from tests.support.harness import ROOT, order, wait_for, write_config

# Alibaba Cloud's own worked example of a V3 signature (the "V3 request structure and
# signature" page): fixed key, date and nonce, RunInstances with two query parameters.
DOC_PARAMS = {
    "ImageId": "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
    "RegionId": "cn-shanghai",
}
DOC_SIGNATURE = "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"


def test_signer_reproduces_the_documented_example():
    query, headers = sign_request(
        AccessKey("YourAccessKeyId", "YourAccessKeySecret"),
        "POST",
        "ecs.cn-shanghai.aliyuncs.com",
        "RunInstances",
        "2014-05-26",
        DOC_PARAMS,
        now=datetime(2023, 10, 26, 10, 22, 32, tzinfo=UTC),
        nonce="3156853299f313e23d1673dc12e1703d",
    )
    assert query == (
        "ImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai"
    )
    assert headers["Authorization"] == (
        "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action;"
        "x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,"
        f"Signature={DOC_SIGNATURE}"
    )
    assert headers["x-acs-content-sha256"] == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    # The fake endpoint's independent verifier agrees on the same example.
    names = [
        "host",
        "x-acs-action",
        "x-acs-content-sha256",
        "x-acs-date",
        "x-acs-signature-nonce",
        "x-acs-version",
    ]
    assert (
        aliyun_expected_signature("YourAccessKeySecret", "POST", query, headers, names, b"")
        == DOC_SIGNATURE
    )


def _aliyun(fake: FakeAliyun, cred: Path, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "aliyun",
        "endpoint": fake.endpoint,
        "template_code": "SMS_123456789",
        "credentials_file": str(cred),
        "retry_initial_s": 0.1,
        "retry_max_s": 0.3,
        "timeout_s": 2,
        **extra,
    }


def _cred(tmp_path: Path, key_id: str, secret: str, name: str = "aliyun.cred") -> Path:
    path = tmp_path / name
    path.write_text(f"# Dysms\naccess_key_id = {key_id}\naccess_key_secret = {secret}\n")
    return path


async def test_signed_sendsms_with_serial_as_outid(
    make_agent, center: FakeCenter, aliyun: FakeAliyun, tmp_path: Path
):
    await center.go_down()
    cred = _cred(tmp_path, aliyun.access_key_id, aliyun.access_key_secret)
    agent = await make_agent(center.url, sms=_aliyun(aliyun, cred, sign_name="搭贝 仓库"))
    status, body = await agent.post(order("ali-1", customer_phone="+86 138 1234 5678"))
    assert (status, body["sms"]) == (202, "queued")
    await wait_for(lambda: aliyun.received, 10, "SendSms")
    (got,) = aliyun.received
    assert aliyun.rejected == []
    assert got.doc == {
        "PhoneNumbers": "13812345678",
        "SignName": "搭贝 仓库",
        "TemplateCode": "SMS_123456789",
        "TemplateParam": f'{{"SN":"{body["serial"]}"}}',
        "OutId": body["serial"],
    }

    # The provider's answer is recorded in the sender's next commit: poll for it.
    async def sent() -> bool:
        doc = (await agent.get("/status"))[1]["sms"]
        return doc["provider"] == "aliyun" and doc["by_state"].get("sent") == 1

    await wait_for(sent, 10, "the notice recorded as sent")


async def test_a_bad_signature_is_refused_and_not_retried(
    make_agent, center: FakeCenter, aliyun: FakeAliyun, tmp_path: Path
):
    await center.go_down()
    cred = _cred(tmp_path, aliyun.access_key_id, "not-the-secret")
    agent = await make_agent(center.url, sms=_aliyun(aliyun, cred))
    status, body = await agent.post(order("ali-2", customer_phone="13812345678"))
    assert (status, body["sms"]) == (202, "queued")

    async def failed() -> bool:
        _, doc = await agent.get("/status")
        return bool(doc["sms"]["by_state"]["failed"] == 1)

    await wait_for(failed, 10, "the refusal to be final")
    assert aliyun.rejected == ["SignatureDoesNotMatch"] and aliyun.received == []
    _, reason = await agent.service.outbox.store.state_of(body["serial"])
    assert "SignatureDoesNotMatch" in reason


async def test_business_limit_control_waits_then_sends_once(
    make_agent, center: FakeCenter, aliyun: FakeAliyun, tmp_path: Path
):
    await center.go_down()
    cred = _cred(tmp_path, aliyun.access_key_id, aliyun.access_key_secret)
    agent = await make_agent(center.url, sms=_aliyun(aliyun, cred, rate_limited_pause_s=0.5))
    aliyun.codes.append("isv.BUSINESS_LIMIT_CONTROL")
    status, body = await agent.post(order("ali-3", customer_phone="13812345678"))
    assert (status, body["sms"]) == (202, "queued")
    await wait_for(lambda: aliyun.received, 10, "SendSms after the pause")
    assert [code for _, code in aliyun.attempts] == ["isv.BUSINESS_LIMIT_CONTROL", "OK"]
    assert aliyun.attempts[1][0] - aliyun.attempts[0][0] >= 0.5  # not retried at once
    assert aliyun.per_serial() == {body["serial"]: 1}


async def test_credentials_directory_wins(
    make_agent,
    center: FakeCenter,
    aliyun: FakeAliyun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    await center.go_down()
    creds_dir = tmp_path / "creds"
    creds_dir.mkdir()
    _cred(creds_dir, aliyun.access_key_id, aliyun.access_key_secret, name="sms")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds_dir))
    wrong = _cred(tmp_path, "someone-else", "nope")
    agent = await make_agent(center.url, sms=_aliyun(aliyun, wrong))
    await agent.post(order("ali-4", customer_phone="13812345678"))
    await wait_for(lambda: aliyun.received, 10, "SendSms")
    assert aliyun.rejected == []


@pytest.mark.parametrize(
    ("sms", "named"),
    [
        ({"provider": "aliyun", "template_code": "SMS_1"}, "sms.credentials_file"),
        ({"provider": "aliyun", "credentials_file": "CRED"}, "sms.template_code"),
        (
            {"provider": "aliyun", "template_code": "SMS_1", "credentials_file": "/nonexistent/x"},
            "/nonexistent/x",
        ),
        ({"provider": "http", "credentials_file": "/nonexistent/y"}, "/nonexistent/y"),
        ({"provider": "http", "url": "not a url"}, "sms.url"),
        ({"provider": "carrier-pigeon"}, "sms.provider"),
        ({"template": "{SN} {order_id}"}, "sms.template"),
        ({"template": "no serial here, {sign_name}"}, "sms.template"),
        ({"give_up_after_s": 0}, "sms.give_up_after_s"),
    ],
)
def test_bad_sms_config_exits_2_naming_the_key(tmp_path: Path, sms: dict[str, Any], named: str):
    cred = _cred(tmp_path, "id", "secret")
    sms = {k: (str(cred) if v == "CRED" else v) for k, v in sms.items()}
    path = write_config(tmp_path, "http://127.0.0.2:1/v3", sms=sms)
    done = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "secret" not in done.stderr
