"""Quotas over real HTTP: one in-process gateway (memory store) in front of
the fake upstream; headers, refusals, defaults and settlement as a client
sees them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.quota.tokens import count_chat
from tests.conftest import StartGateway, gateway_env
from tests.support.openai_schema import validate
from tests.support.processes import FakeUpstreamProcess, InProcessGateway

MESSAGES = [{"role": "user", "content": "hello there"}]
PROMPT = count_chat(MESSAGES)
TPM = 1000


def write_tenant(tenants: Path, tenant_id: str, limits: dict[str, Any], **extra: Any) -> None:
    doc = {
        "id": tenant_id,
        "display_name": tenant_id,
        "tier": "standard",
        "allowed_models": ["*"],
        "default_priority": "standard",
        "allowed_priorities": ["interactive", "standard", "batch"],
        "limits": limits,
        **extra,
    }
    (tenants / f"{tenant_id}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def point_at(policies: Path, url: str, health: dict[str, Any] | None = None) -> None:
    """Send the shipped `local` pool to one replica at `url`, with `health`
    settings over the shipped ones."""
    models = yaml.safe_load((policies / "models.yaml").read_text())
    models["pools"]["local"]["replicas"] = [{"url": url, "weight": 1, "max_in_flight": 256}]
    models["pools"]["local"]["health"].update(health or {})
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))


@pytest.fixture
def gw(
    fake_upstream: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    start_gateway: StartGateway,
) -> InProcessGateway:
    tenants, policies = policy_dirs
    point_at(policies, fake_upstream.url)
    write_tenant(
        tenants,
        "quota-http",
        {"tokens_per_minute": TPM, "requests_per_minute": 50, "max_output_tokens": 100},
    )
    return start_gateway(gateway_env(fake_upstream.url, tenants, policies))


def post(gw: InProcessGateway, token: str, **body: Any) -> httpx.Response:
    payload = {"model": "smollm2", "messages": MESSAGES, **body}
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json=payload,
        timeout=30,
    )


def test_headers_on_success_track_settled_usage(
    gw: InProcessGateway, mint: Callable[..., str]
) -> None:
    token = mint("quota-http")
    first = post(
        gw, token, max_tokens=50, x_fake={"completion_tokens": 10, "prompt_tokens": PROMPT}
    )
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(TPM - PROMPT - 50)
    assert first.headers["x-ratelimit-limit-requests"] == "50"
    assert first.headers["x-ratelimit-remaining-requests"] == "49"
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    # The first request settled at its real usage (PROMPT + 10): 40 came back.
    second = post(gw, token, max_tokens=50, x_fake={"prompt_tokens": PROMPT})
    assert second.headers["x-ratelimit-remaining-tokens"] == str(
        TPM - (PROMPT + 10) - (PROMPT + 50)
    )


def test_streams_settle_from_the_usage_event(
    gw: InProcessGateway, mint: Callable[..., str]
) -> None:
    token = mint("quota-http")
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json={
            "model": "smollm2",
            "messages": MESSAGES,
            "max_tokens": 80,
            "stream": True,
            "x_fake": {"completion_tokens": 5, "prompt_tokens": PROMPT},
        },
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-tokens"] == str(TPM - PROMPT - 80)
        body = b"".join(response.iter_bytes())
    assert b"[DONE]" in body and b'"usage"' not in body  # the client did not ask for usage
    after = post(gw, token, max_tokens=1, x_fake={"prompt_tokens": PROMPT})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(TPM - (PROMPT + 5) - (PROMPT + 1))


def test_max_output_tokens_is_the_default_and_the_ceiling(
    gw: InProcessGateway, mint: Callable[..., str]
) -> None:
    token = mint("quota-http")
    response = post(gw, token, x_fake={"completion_tokens": 1000})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 100
    too_many = post(gw, token, max_tokens=101)
    assert too_many.status_code == 400
    body = too_many.json()
    validate(body, "ErrorResponse")
    assert (body["error"]["code"], body["error"]["param"]) == ("max_tokens_exceeded", "max_tokens")


def test_a_refusal_is_an_openai_429_with_retry_after(
    gw: InProcessGateway, mint: Callable[..., str]
) -> None:
    token = mint("quota-http")
    spend = TPM - 100 - 20  # then 20 tokens are left: too few for PROMPT + 100
    used = {"prompt_tokens": spend, "completion_tokens": 100}
    assert post(gw, token, max_tokens=100, x_fake=used).status_code == 200
    refused = post(gw, token, max_tokens=100)
    assert refused.status_code == 429
    body = refused.json()
    validate(body, "ErrorResponse")
    assert (body["error"]["code"], body["error"]["type"]) == ("rate_limit_exceeded", "tokens")
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-tokens"] == "20"
    assert refused.headers["x-request-id"]
    # The official client sees its usual exception.
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=100)  # type: ignore[arg-type]
    assert info.value.code == "rate_limit_exceeded"


def test_backend_errors_refund_the_reservation(
    gw: InProcessGateway, mint: Callable[..., str]
) -> None:
    token = mint("quota-http")
    failed = post(gw, token, max_tokens=100, x_fake={"status": 400})
    assert failed.status_code == 400
    assert failed.headers["x-ratelimit-limit-tokens"] == str(TPM)
    ok = post(gw, token, max_tokens=1, x_fake={"prompt_tokens": PROMPT})
    # Nothing of the refused request is still counted; only `ok` is.
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(TPM - PROMPT - 1)
