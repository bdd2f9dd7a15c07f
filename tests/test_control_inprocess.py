"""The control application in process (deployments/control.py): what the one base URL answers
when HAProxy sends a request to no model's application. Its readiness and a model's application being down are set
by the test; the billing actor's class and its ledger are real."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deployments.billing.service import load_or_create_admin_token
from deployments.server.requests import NO_STORAGE
from tests.inprocess import InProcessControl, inprocess_control

MODELS = ("qwen3-next-tiny", "qwen3-moe-tiny", "elsewhere-tiny")
CHAT = {"messages": [{"role": "user", "content": "hej"}], "max_tokens": 4}


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[InProcessControl]:
    async with inprocess_control(tmp_path, MODELS) as control:
        yield control


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_lists_every_model_and_is_healthy_once_each_application_answers(control: InProcessControl) -> None:
    key = control.key()
    r = await control.client.get("/v1/models", headers=auth(key))
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == list(MODELS)
    assert "x-ratelimit-limit-requests" in r.headers
    limited = control.key("eu-only", allowed_models=["qwen3-moe-tiny"])
    r = await control.client.get("/v1/models", headers=auth(limited))
    assert [m["id"] for m in r.json()["data"]] == ["qwen3-moe-tiny"]

    r = await control.client.get("/healthz")
    assert (r.status_code, r.headers["retry-after"]) == (503, "5")
    control.ready.update(dict.fromkeys(MODELS[:2], True))
    r = await control.client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["models"] == {
        "qwen3-next-tiny": {"ready": True},
        "qwen3-moe-tiny": {"ready": True},
        "elsewhere-tiny": {"ready": False},
    }
    control.ready["elsewhere-tiny"] = True
    r = await control.client.get("/healthz")
    assert (r.status_code, r.json()["status"]) == (200, "ok")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
async def test_a_model_that_is_not_served_is_404_without_its_name_and_none_is_400(
    control: InProcessControl, path: str
) -> None:
    body = {"input": "hej"} if path == "/v1/responses" else {"prompt": "hej"} if path == "/v1/completions" else CHAT
    r = await control.client.post(path, json={**body, "model": "gpt-secret-name"}, headers=auth(control.key()))
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error")
    assert "gpt-secret-name" not in r.text
    r = await control.client.post(path, json=body, headers=auth(control.key()))  # no model at all: as OpenAI says
    assert (r.status_code, r.json()["error"]["param"]) == (400, "model"), r.text


async def test_a_key_comes_first_and_a_clients_mistake_gets_the_replicas_answer(control: InProcessControl) -> None:
    r = await control.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    key = control.key()
    r = await control.client.post("/v1/chat/completions", content=b"{not json", headers=auth(key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await control.client.post("/v1/chat/completions", json={**CHAT, "model": "nope", "fancy": 1}, headers=auth(key))
    assert r.status_code == 400 and r.json()["error"]["param"] == "fancy"
    limited = control.key("eu-only", allowed_models=["qwen3-moe-tiny"])
    r = await control.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "qwen3-next-tiny"}, headers=auth(limited)
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    reader = control.key("readers", role="viewer")
    r = await control.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "qwen3-moe-tiny"}, headers=auth(reader)
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


async def test_a_served_model_whose_application_is_not_up_is_503_with_retry_after(control: InProcessControl) -> None:
    key = control.key()
    # Without HAProxy's dispatch (the body named the model, but no rule sent it on) ...
    r = await control.client.post("/v1/chat/completions", json={**CHAT, "model": "qwen3-moe-tiny"}, headers=auth(key))
    assert (r.status_code, r.headers["retry-after"]) == (503, "5")
    assert r.json()["error"]["code"] == "engine_unavailable" and "qwen3-moe-tiny" in r.json()["error"]["message"]
    # ... and with it, before Serve has the model's application at its prefix: the path falls through to "/".
    r = await control.client.post(
        "/models/qwen3-next-tiny/v1/chat/completions", json={**CHAT, "model": "qwen3-next-tiny"}, headers=auth(key)
    )
    assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_unavailable")
    r = await control.client.post("/models/unknown/v1/chat/completions", json=CHAT, headers=auth(key))
    assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_url")
    r = await control.client.post("/models/qwen3-next-tiny/v1/chat/completions", json=CHAT)
    assert r.status_code == 401


async def test_nothing_stored_can_be_fetched_continued_or_cancelled(control: InProcessControl) -> None:
    key = control.key()
    assert (await control.client.get("/v1/responses/resp_1")).status_code == 401
    for method, path in (
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
    ):
        r = await control.client.request(method, path, headers=auth(key))
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["message"] == NO_STORAGE
    r = await control.client.post(
        "/v1/responses",
        json={"model": "qwen3-moe-tiny", "input": "hej", "previous_response_id": "resp_1"},
        headers=auth(key),
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


async def test_usage_and_administration_are_served_here(control: InProcessControl) -> None:
    key = control.key()
    r = await control.client.get("/v1/usage/summary", headers=auth(key))
    assert r.status_code == 200, r.text
    r = await control.client.get("/admin/tenants", headers=auth(key))
    assert (r.status_code, r.json()["error"]["code"]) == (403, "permission_denied")  # a member's key is no operator's
    r = await control.client.get("/dashboard/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error


async def test_admin_api_roles_and_audit_log(control: InProcessControl) -> None:
    admin_token = load_or_create_admin_token(control.service._spec.secrets_path)  # in the data folder
    op = auth(admin_token)
    r = await control.client.post(
        "/admin/tenants",
        json={"id": "aarhus", "plan": "monthly", "monthly_fee_dkk": "500", "discount_percent": "10"},
        headers=op,
    )
    assert r.status_code == 201 and r.json()["plan"] == {
        "name": "monthly",
        "monthly_fee_dkk": "500.00",
        "discount_percent": "10",
    }
    owner = (
        await control.client.post("/admin/tenants/aarhus/members", json={"name": "Ida", "role": "owner"}, headers=op)
    ).json()
    created = await control.client.post("/admin/tenants/aarhus/keys", json={"member_id": owner["id"]}, headers=op)
    assert created.status_code == 201 and created.json()["role"] == "owner"
    owner_key = created.json()["key"]
    # The owner runs the organisation: adds an admin and a member, gives the member a key limited to Danish models.
    mem = (
        await control.client.post(
            "/admin/tenants/aarhus/members", json={"name": "Bo", "role": "member"}, headers=auth(owner_key)
        )
    ).json()
    member_key = (
        await control.client.post(
            "/admin/tenants/aarhus/keys",
            json={"member_id": mem["id"], "allowed_models": ["region:dk"], "budget_dkk": "25", "rpm": 30},
            headers=auth(owner_key),
        )
    ).json()
    assert member_key["role"] == "member" and member_key["budget_dkk"] == "25" and member_key["rpm"] == 30
    # A member cannot manage keys; an owner cannot change plans; nobody but the operator lists tenants.
    assert_error(
        await control.client.post("/admin/tenants/aarhus/keys", json={}, headers=auth(member_key["key"])),
        403,
        "permission_denied",
    )
    assert_error(
        await control.client.patch("/admin/tenants/aarhus", json={"discount_percent": "50"}, headers=auth(owner_key)),
        403,
        "permission_denied",
    )
    assert_error(await control.client.get("/admin/tenants", headers=auth(owner_key)), 403, "permission_denied")
    # Bad input is a 400 in OpenAI's shape, never a 500.
    assert_error(
        await control.client.post("/admin/tenants/aarhus/keys", json={"rpm": -1}, headers=auth(owner_key)),
        400,
        "invalid_value",
    )
    assert_error(
        await control.client.post("/admin/tenants/aarhus/keys", json={"colour": 1}, headers=auth(owner_key)),
        400,
        "invalid_value",
    )
    assert_error(
        await control.client.post("/admin/tenants/aarhus/keys", content=b"{", headers=auth(owner_key)),
        400,
        "invalid_json",
    )
    assert_error(await control.client.get("/admin/tenants", headers=auth("ank_admin_wrong")), 401, "invalid_api_key")
    # Removing the member revokes what their key can do at once.
    assert (
        await control.client.delete(f"/admin/tenants/aarhus/members/{mem['id']}", headers=auth(owner_key))
    ).status_code == 200
    assert_error(await control.client.get("/v1/models", headers=auth(member_key["key"])), 401, "invalid_api_key")
    revoked = await control.client.delete(f"/admin/keys/{member_key['id']}", headers=auth(owner_key))
    assert revoked.json()["revoked_at"] is not None
    audit = (await control.client.get("/admin/tenants/aarhus/audit", headers=auth(owner_key))).json()["data"]
    actions = [e["action"] for e in reversed(audit)]
    assert actions == [
        "tenant.create",
        "tenant.update",
        "member.add",
        "key.create",
        "member.add",
        "key.create",
        "member.remove",
        "key.revoke",
    ]
    assert {e["actor"] for e in audit} == {"admin-token", f"key:{created.json()['id']}"}
    dump = str(audit)
    assert owner_key not in dump and member_key["key"] not in dump


DEEP = b"[" * 50_000  # within the body limit, far past the JSON parser's depth


async def test_admin_reads_no_body_before_the_caller_is_known_and_a_deep_one_is_400(control: InProcessControl) -> None:
    admin_token = load_or_create_admin_token(control.service._spec.secrets_path)
    huge = b"{" + b" " * (64 * 1024)  # past the body limit (64 KiB here), and no JSON either
    for body in (b"{not json", DEEP, huge):
        for token in (None, "not-a-token", "ank_admin_" + "0" * 64, control.key()[:-1] + "!"):
            headers = auth(token) if token else {}
            r = await control.client.post("/admin/tenants", content=body, headers=headers)
            assert_error(r, 401, "invalid_api_key")
            r = await control.client.patch("/admin/keys/0123456789ab", content=body, headers=headers)
            assert_error(r, 401, "invalid_api_key")
    # No billing call for any of them: neither the shape of a key nor of the admin token, or the admin token's
    # shape with another value, told from billing's key check (asked once).
    calls = control.handle.calls
    assert calls["authenticate"] == 0 and calls["is_admin_token"] == 0 and calls["key_check"] == 1
    for token in (admin_token, control.key()):  # once the caller is known, the body is read, and refused as a client's
        r = await control.client.post("/admin/tenants", content=DEEP, headers=auth(token))
        assert_error(r, 400, "invalid_json")
        r = await control.client.post("/admin/tenants", content=huge, headers=auth(token))
        assert_error(r, 413, "request_too_large")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
async def test_the_public_routes_read_no_body_before_the_key_and_a_deep_one_is_400(
    control: InProcessControl, path: str
) -> None:
    for body in (b"{not json", DEEP, b"{" + b" " * (64 * 1024)):
        for headers in ({}, auth("not-a-key")):
            assert_error(await control.client.post(path, content=body, headers=headers), 401, "invalid_api_key")
    assert control.handle.calls["authenticate"] == 0
    r = await control.client.post(path, content=DEEP, headers=auth(control.key()))
    assert_error(r, 400, "invalid_json")
