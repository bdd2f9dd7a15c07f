"""Tenant isolation in-process (OWASP API1 broken object-level and API5 broken function-level authorization): every
route of the one base URL is classified, and for each one another organisation's key finds nothing (404) and
changes nothing, a member's or viewer's key cannot manage, no key at all is a 401, and operator-only routes need the
admin token.

The routes are the control application's (deployments/control.py) and an engine replica's (deployments/server/),
which HAProxy puts behind one base URL. They run here on the control application: a call of a model that passes
its checks is answered 503 (no model's application is up in process), which is the sign that it got past the door.
The replica's own door (``KeyGate``) is tested over a real vLLM in test_server_door.py and test_server_inprocess.py.

The route table below must list every route of both apps: a new route without a row fails the first test.

Last, money and capacity are the operator's: no owner or admin can give its organisation credit or pass the
ceilings the operator set (issue 15, hole 6).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.datastructures import State
from starlette.routing import Route as StarletteRoute

from deployments.billing.governance import Actor
from deployments.billing.ledger import COMPLETED, UsageEvent
from deployments.billing.service import BillingService, BillingSpec, load_or_create_admin_token
from deployments.contracts import UsageReport
from deployments.errors import Conflict
from deployments.keys import ROLES
from deployments.server.app import create_server_app
from tests.inprocess import InProcessControl, inprocess_control

MODEL = "qwen3-next-tiny"
OPERATOR = Actor.operator("isolation-test")


@dataclass
class Org:
    """An organisation with a member (and that member's key) in every role, plus a spare member and a spare key
    that routes changing one member or key act on."""

    tenant: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> API key
    spare_member: str = ""
    spare_key_id: str = ""


@dataclass(frozen=True)
class RouteCase:
    """How a route is guarded, and a valid request to it aimed at an organisation's objects."""

    # public | keyed (any key, own data) | stored (any key, and nothing is stored: 404) | caller (may call models)
    # | tenant | manager | operator
    access: str
    path: Callable[[Org], str]
    body: dict[str, Any] | None = None


def _fixed(path: str) -> Callable[[Org], str]:
    return lambda org: path


ROUTES: dict[tuple[str, str], RouteCase] = {
    ("GET", "/healthz"): RouteCase("public", _fixed("/healthz")),
    ("GET", "/openapi.json"): RouteCase("public", _fixed("/openapi.json")),
    ("GET", "/dashboard"): RouteCase("public", _fixed("/dashboard")),
    ("GET", "/dashboard/"): RouteCase("public", _fixed("/dashboard/")),
    ("GET", "/dashboard/{name:path}"): RouteCase("public", _fixed("/dashboard/app.js")),
    ("GET", "/v1/models"): RouteCase("keyed", _fixed("/v1/models")),
    ("GET", "/v1/models/{model_id:path}"): RouteCase("keyed", _fixed(f"/v1/models/{MODEL}")),
    ("GET", "/v1/usage"): RouteCase("keyed", _fixed("/v1/usage")),
    ("GET", "/v1/usage/summary"): RouteCase("keyed", _fixed("/v1/usage/summary")),
    ("POST", "/v1/chat/completions"): RouteCase(
        "caller",
        _fixed("/v1/chat/completions"),
        {"model": MODEL, "messages": [{"role": "user", "content": "hej"}], "max_tokens": 2},
    ),
    ("POST", "/v1/completions"): RouteCase(
        "caller", _fixed("/v1/completions"), {"model": MODEL, "prompt": "hej", "max_tokens": 2}
    ),
    ("POST", "/v1/responses"): RouteCase("caller", _fixed("/v1/responses"), {"model": MODEL, "input": "hej"}),
    # A model's application, by the prefix HAProxy puts on the path, before Serve has it there.
    ("POST", "/models/{prefix}/{rest:path}"): RouteCase(
        "caller",
        _fixed(f"/models/{MODEL}/v1/chat/completions"),
        {"model": MODEL, "messages": [{"role": "user", "content": "hej"}], "max_tokens": 2},
    ),
    ("GET", "/models/{prefix}/{rest:path}"): RouteCase("caller", _fixed(f"/models/{MODEL}/v1/models")),
    ("DELETE", "/models/{prefix}/{rest:path}"): RouteCase("caller", _fixed(f"/models/{MODEL}/v1/responses/resp_1")),
    ("GET", "/v1/responses/{response_id}"): RouteCase("stored", _fixed("/v1/responses/resp_1")),
    ("DELETE", "/v1/responses/{response_id}"): RouteCase("stored", _fixed("/v1/responses/resp_1")),
    ("POST", "/v1/responses/{response_id}/cancel"): RouteCase("stored", _fixed("/v1/responses/resp_1/cancel")),
    ("GET", "/admin/tenants"): RouteCase("operator", _fixed("/admin/tenants")),
    ("POST", "/admin/tenants"): RouteCase("operator", _fixed("/admin/tenants"), {"id": "brand-new-org"}),
    ("GET", "/admin/audit"): RouteCase("operator", _fixed("/admin/audit")),
    ("GET", "/admin/tenants/{tenant}"): RouteCase("tenant", lambda o: f"/admin/tenants/{o.tenant}"),
    ("PATCH", "/admin/tenants/{tenant}"): RouteCase(
        "manager", lambda o: f"/admin/tenants/{o.tenant}", {"budget_dkk": "5"}
    ),
    ("GET", "/admin/tenants/{tenant}/members"): RouteCase("manager", lambda o: f"/admin/tenants/{o.tenant}/members"),
    ("POST", "/admin/tenants/{tenant}/members"): RouteCase(
        "manager", lambda o: f"/admin/tenants/{o.tenant}/members", {"name": "Eve", "role": "member"}
    ),
    ("PATCH", "/admin/tenants/{tenant}/members/{member_id}"): RouteCase(
        "manager", lambda o: f"/admin/tenants/{o.tenant}/members/{o.spare_member}", {"role": "viewer"}
    ),
    ("DELETE", "/admin/tenants/{tenant}/members/{member_id}"): RouteCase(
        "manager", lambda o: f"/admin/tenants/{o.tenant}/members/{o.spare_member}"
    ),
    ("GET", "/admin/tenants/{tenant}/keys"): RouteCase("manager", lambda o: f"/admin/tenants/{o.tenant}/keys"),
    ("POST", "/admin/tenants/{tenant}/keys"): RouteCase("manager", lambda o: f"/admin/tenants/{o.tenant}/keys", {}),
    ("PATCH", "/admin/keys/{key_id}"): RouteCase("manager", lambda o: f"/admin/keys/{o.spare_key_id}", {"rpm": 7}),
    ("DELETE", "/admin/keys/{key_id}"): RouteCase("manager", lambda o: f"/admin/keys/{o.spare_key_id}"),
    ("GET", "/admin/tenants/{tenant}/audit"): RouteCase("manager", lambda o: f"/admin/tenants/{o.tenant}/audit"),
}
ROUTES_BY_ACCESS = {case.access for case in ROUTES.values()}
GUARDED = {name: case for name, case in ROUTES.items() if case.access != "public"}
OBJECT_ROUTES = {name: case for name, case in ROUTES.items() if case.access in ("tenant", "manager")}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[InProcessControl]:
    async with inprocess_control(tmp_path, (MODEL, "qwen3-moe-tiny")) as control:
        control.ready.update(dict.fromkeys(control.ready, True))  # healthy, though no call reaches a model here
        yield control


def make_org(stack: InProcessControl, tenant: str, **settings: Any) -> Org:
    """An organisation as the operator sets it up (a monthly cap of 100 DKK unless ``settings`` say otherwise)."""
    governance = stack.service.governance
    governance.create_tenant(OPERATOR, tenant, **(settings or {"budget_kind": "monthly", "budget_dkk": "100"}))
    org = Org(tenant)
    for role in ROLES:
        member = governance.add_member(OPERATOR, tenant, f"{role} of {tenant}", role)
        _, org.keys[role] = governance.create_key(OPERATOR, tenant, member_id=member["id"])
    org.spare_member = governance.add_member(OPERATOR, tenant, "spare", "member")["id"]
    org.spare_key_id = governance.create_key(OPERATOR, tenant, name="spare")[0].key_id
    return org


def snapshot(stack: InProcessControl, org: Org) -> dict[str, Any]:
    """Everything the operator can see of an organisation, to show that a refused call changed nothing."""
    governance = stack.service.governance
    return {
        "tenant": governance.get_tenant(OPERATOR, org.tenant),
        "members": governance.list_members(OPERATOR, org.tenant),
        "keys": [k.public() for k in governance.list_keys(OPERATOR, org.tenant)],
        "audit": governance.audit_log(OPERATOR, org.tenant, limit=1000),
        "usage": list(stack.service.ledger.events(org.tenant)),
    }


async def bill(stack: InProcessControl, org: Org, key: str, requests: int) -> None:
    """Usage of ``requests`` calls by ``key``, recorded as an engine replica reports it."""
    now = datetime.now(UTC)
    reports = [
        UsageReport(UsageEvent(uuid.uuid4().hex, org.tenant, key.split("_")[1], MODEL, 5, 0, 2, now, now, COMPLETED), 0)
        for _ in range(requests)
    ]
    assert len(await stack.service.record(reports)) == requests


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(stack: InProcessControl, route: tuple[str, str], target: Org, headers: dict[str, str]) -> httpx.Response:
    case = ROUTES[route]
    return await stack.client.request(route[0], case.path(target), json=case.body, headers=headers)


def expect(r: httpx.Response, status: int, code: str | None, what: str, failures: list[str]) -> None:
    got_code = r.json().get("error", {}).get("code") if r.headers.get("content-type", "").startswith("app") else None
    if r.status_code != status or (code is not None and got_code != code):
        failures.append(f"{what}: expected {status} {code or ''}, got {r.status_code} {got_code or r.text[:80]}")


async def test_every_route_of_the_app_is_classified(stack: InProcessControl) -> None:
    replica = create_server_app(State(), MODEL, [], max_body_bytes=64 * 1024)  # the routes, without an engine
    served = {
        (method, route.path)
        for app in (stack.app, replica)
        for route in app.routes
        if isinstance(route, StarletteRoute)
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert served == set(ROUTES), (
        f"unclassified routes: {sorted(served - set(ROUTES))}; gone: {sorted(set(ROUTES) - served)}. "
        "Add each new route to ROUTES with its access rule."
    )


async def test_no_key_a_bad_key_or_a_dead_key_is_401_on_every_guarded_route(stack: InProcessControl) -> None:
    org = make_org(stack, "org-a")
    governance = stack.service.governance
    revoked = governance.create_key(OPERATOR, org.tenant)
    governance.revoke_key(OPERATOR, revoked[0].key_id)
    leaver = governance.add_member(OPERATOR, org.tenant, "leaver", "owner")
    _, leaver_key = governance.create_key(OPERATOR, org.tenant, member_id=leaver["id"])
    governance.remove_member(OPERATOR, org.tenant, leaver["id"])
    admin_token = load_or_create_admin_token(stack.service._spec.secrets_path)
    before = snapshot(stack, org)
    credentials = {
        "no header": {},
        "basic scheme": {"Authorization": f"Basic {org.keys['owner']}"},
        "empty bearer": {"Authorization": "Bearer "},
        "malformed key": bearer("ank_not-a-key"),
        "wrong secret": bearer(org.keys["owner"][:-4] + "AAAA"),
        "revoked key": bearer(revoked[1]),
        "removed member's key": bearer(leaver_key),
    }
    failures: list[str] = []
    for route in GUARDED:
        for label, headers in credentials.items():
            expect(await call(stack, route, org, headers), 401, "invalid_api_key", f"{route} with {label}", failures)
        if not route[1].startswith("/admin"):  # the operator's token administers; it is not an API key
            expect(await call(stack, route, org, bearer(admin_token)), 401, "invalid_api_key", f"{route} op", failures)
    assert not failures, "\n".join(failures)
    assert snapshot(stack, org) == before


async def test_another_organisations_objects_answer_404_and_stay_unchanged(stack: InProcessControl) -> None:
    a, b = make_org(stack, "org-a"), make_org(stack, "org-b")
    ghost = Org("org-ghost", spare_member="mem_0123456789abcdef", spare_key_id="0123456789ab")  # exists nowhere
    before = snapshot(stack, b)
    failures: list[str] = []
    for role in ROLES:  # even an owner or admin of A is a stranger to B
        for route in OBJECT_ROUTES:
            r = await call(stack, route, b, bearer(a.keys[role]))
            expect(r, 404, "not_found", f"{role} of A on {route} of B", failures)
            # Word for word what an organisation that does not exist gets: no oracle for what B has.
            nothing = (await call(stack, route, ghost, bearer(a.keys[role]))).text
            for field_name in ("tenant", "spare_member", "spare_key_id"):
                nothing = nothing.replace(getattr(ghost, field_name), getattr(b, field_name))
            if r.text != nothing:
                failures.append(f"{role} of A on {route} of B: {r.text[:100]} differs from {nothing[:100]}")
    # A's own path with B's object in it: the member and key ids are checked against the organisation too.
    owner = bearer(a.keys["owner"])
    mixed = [
        ("PATCH", f"/admin/tenants/{a.tenant}/members/{b.spare_member}", {"role": "viewer"}),
        ("DELETE", f"/admin/tenants/{a.tenant}/members/{b.spare_member}", None),
        ("POST", f"/admin/tenants/{a.tenant}/keys", {"member_id": b.spare_member}),
    ]
    for method, path, body in mixed:
        r = await stack.client.request(method, path, json=body, headers=owner)
        expect(r, 404, "not_found", f"owner of A: {method} {path}", failures)
    assert not failures, "\n".join(failures)
    assert snapshot(stack, b) == before


async def test_members_and_viewers_cannot_manage_and_only_the_operator_runs_operator_routes(
    stack: InProcessControl,
) -> None:
    a = make_org(stack, "org-a")
    before = snapshot(stack, a)
    failures: list[str] = []
    for role in ("member", "viewer"):
        for route, case in OBJECT_ROUTES.items():
            if case.access == "manager":
                r = await call(stack, route, a, bearer(a.keys[role]))
                expect(r, 403, "permission_denied", f"{role} on {route} of its own organisation", failures)
    for role in ROLES:
        for route, case in GUARDED.items():
            if case.access == "operator":
                r = await call(stack, route, a, bearer(a.keys[role]))
                expect(r, 403, "permission_denied", f"{role} on operator route {route}", failures)
    for route, case in ROUTES.items():
        if case.access == "caller" and route[0] == "POST":
            r = await call(stack, route, a, bearer(a.keys["viewer"]))
            expect(r, 403, "permission_denied", f"viewer calling a model: {route}", failures)
    assert not failures, "\n".join(failures)
    assert snapshot(stack, a) == before
    assert stack.service.governance.list_tenants(OPERATOR) == [before["tenant"]]  # no organisation was created


async def test_the_admin_token_runs_every_admin_route_and_managers_run_their_own(stack: InProcessControl) -> None:
    """The positive side, so that the refusals above are refusals and not broken requests."""
    a, b, c = make_org(stack, "org-a"), make_org(stack, "org-b"), make_org(stack, "org-c")
    token = bearer(load_or_create_admin_token(stack.service._spec.secrets_path))
    failures: list[str] = []
    administration = {"public", "operator", "tenant", "manager"}
    everything_but_the_operators = set(ROUTES_BY_ACCESS) - {"operator", "caller", "stored"}  # those two: below
    callers = ((token, a, administration), (bearer(b.keys["owner"]), b, everything_but_the_operators))
    for caller, org, accesses in (*callers, (bearer(c.keys["admin"]), c, everything_but_the_operators)):
        for route, case in ROUTES.items():
            if case.access in accesses:
                r = await call(stack, route, org, caller if case.access != "public" else {})
                if not 200 <= r.status_code < 300:
                    failures.append(f"{route} on {org.tenant}: {r.status_code} {r.text[:120]}")
    for role in ("owner", "admin", "member"):
        for route, case in ROUTES.items():
            r = await call(stack, route, a, bearer(a.keys[role]))
            if case.access == "caller":  # past the door: the model's application is not up in process
                expect(r, 503, "engine_unavailable", f"{role} on {route}", failures)
            if case.access == "stored":  # nothing is stored (zero data retention)
                expect(r, 404, "not_found", f"{role} on {route}", failures)
    assert not failures, "\n".join(failures)


async def test_usage_and_summary_show_only_the_callers_own_data(stack: InProcessControl) -> None:
    a, b = make_org(stack, "org-a"), make_org(stack, "org-b")
    sent = {"org-a": {"owner": 1, "member": 2}, "org-b": {"member": 3}}
    for org in (a, b):
        for role, count in sent[org.tenant].items():
            await bill(stack, org, org.keys[role], count)
    usage = "/v1/usage"
    expected = {"owner": ("organization", 3), "admin": ("organization", 3), "viewer": ("organization", 3)}
    for role, (scope, requests) in {**expected, "member": ("key", 2)}.items():
        body = (await stack.client.get(usage, headers=bearer(a.keys[role]))).json()
        assert (body["tenant"], body["scope"], body["totals"]["requests"]) == ("org-a", scope, requests), role
        summary = (await stack.client.get(f"{usage}/summary", headers=bearer(a.keys[role]))).json()
        assert summary["tenant"] == "org-a" and summary["key_id"] == a.keys[role].split("_")[1]
        assert summary["totals"]["requests"] == requests, role
    b_owner = (await stack.client.get(usage, headers=bearer(b.keys["owner"]))).json()
    assert b_owner["tenant"] == "org-b" and b_owner["totals"]["requests"] == 3
    # No parameter picks another organisation or key: unknown ones are refused, not ignored.
    for param in ("tenant", "organization", "key_id", "user"):
        r = await stack.client.get(usage, params={param: "org-b"}, headers=bearer(a.keys["owner"]))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", param


async def test_roles_cannot_be_raised_from_below(stack: InProcessControl) -> None:
    """Function-level checks inside allowed routes: what an admin or member may not grant or change."""
    a = make_org(stack, "org-a")
    governance = stack.service.governance
    members = {m["role"]: m["id"] for m in governance.list_members(OPERATOR, a.tenant) if m["name"] != "spare"}
    keys = {k.role: k.key_id for k in governance.list_keys(OPERATOR, a.tenant) if k.member_id is not None}
    admin, member = bearer(a.keys["admin"]), bearer(a.keys["member"])
    refused = [
        (admin, "POST", f"/admin/tenants/{a.tenant}/members", {"name": "Mallory", "role": "owner"}),
        (admin, "POST", f"/admin/tenants/{a.tenant}/keys", {"role": "owner"}),
        (admin, "POST", f"/admin/tenants/{a.tenant}/keys", {"member_id": members["owner"]}),
        (admin, "PATCH", f"/admin/tenants/{a.tenant}/members/{members['admin']}", {"role": "owner"}),
        (admin, "PATCH", f"/admin/tenants/{a.tenant}/members/{members['owner']}", {"role": "viewer"}),
        (admin, "DELETE", f"/admin/tenants/{a.tenant}/members/{members['owner']}", None),
        (admin, "PATCH", f"/admin/keys/{keys['owner']}", {"rpm": 1}),
        (admin, "DELETE", f"/admin/keys/{keys['owner']}", None),
        (admin, "PATCH", f"/admin/keys/{a.spare_key_id}", {"role": "owner"}),
        (admin, "PATCH", f"/admin/tenants/{a.tenant}", {"discount_percent": "50"}),
        (admin, "PATCH", f"/admin/tenants/{a.tenant}", {"plan": "monthly"}),
        (member, "PATCH", f"/admin/keys/{keys['member']}", {"budget_dkk": "1000000"}),
        (member, "PATCH", f"/admin/keys/{keys['member']}", {"rpm": 1000000}),
    ]
    before = snapshot(stack, a)
    failures: list[str] = []
    for headers, method, path, body in refused:
        r = await stack.client.request(method, path, json=body, headers=headers)
        expect(r, 403, "permission_denied", f"{method} {path} {body}", failures)
    assert not failures, "\n".join(failures)
    assert snapshot(stack, a) == before


# -- money and ceilings are the operator's (issue 15, hole 6) ----------------------------------------------------


def operator_token(stack: InProcessControl) -> dict[str, str]:
    return bearer(load_or_create_admin_token(stack.service._spec.secrets_path))


async def budget_seen(stack: InProcessControl, org: Org) -> Any:
    """The organisation's budget as its owner's usage summary shows it: kind, limit, spent, reserved and left."""
    r = await stack.client.get("/v1/usage/summary", headers=bearer(org.keys["owner"]))
    assert r.status_code == 200, r.text
    return r.json()["budget"]


async def test_a_customer_cannot_give_itself_credit(stack: InProcessControl) -> None:
    """Prepaid credit is the operator's: an owner or admin can neither set it, raise it, trade it for a monthly cap
    nor lift it, nor give credit to an organisation without a budget. Each try is a 403 that changes nothing: not
    the budget, not what it has spent, not the audit log."""
    prepaid = make_org(stack, "org-p", budget_kind="prepaid", budget_dkk="100")
    unbudgeted = make_org(stack, "org-n", budget_kind=None)
    await bill(stack, prepaid, prepaid.keys["member"], 3)
    tries = [
        (prepaid, {"budget_dkk": "1000"}),  # a top-up
        (prepaid, {"budget_kind": "prepaid", "budget_dkk": "1000"}),
        (prepaid, {"budget_kind": "prepaid", "budget_dkk": "100"}),  # even the amount it has: setting it is not theirs
        (prepaid, {"budget_kind": "monthly", "budget_dkk": "1000"}),  # credit traded for a cap that renews monthly
        (prepaid, {"budget_kind": None}),  # no budget at all
        (unbudgeted, {"budget_kind": "prepaid", "budget_dkk": "1000"}),
        (unbudgeted, {"budget_kind": "monthly", "budget_dkk": "5", "discount_percent": "50"}),
    ]
    orgs = (prepaid, unbudgeted)
    before = {org.tenant: (snapshot(stack, org), await budget_seen(stack, org)) for org in orgs}
    assert before["org-p"][1]["kind"] == "prepaid" and before["org-p"][1]["limit_dkk"] == "100"
    assert before["org-p"][1]["spent_dkk"] != "0" and before["org-n"][1] is None
    failures: list[str] = []
    for org, body in tries:
        for role in ("owner", "admin"):
            r = await stack.client.patch(f"/admin/tenants/{org.tenant}", json=body, headers=bearer(org.keys[role]))
            expect(r, 403, "permission_denied", f"{role} of {org.tenant}: {body}", failures)
    assert not failures, "\n".join(failures)
    assert {org.tenant: (snapshot(stack, org), await budget_seen(stack, org)) for org in orgs} == before


async def test_the_operator_tops_up_credit_and_customers_set_their_own_monthly_cap(stack: InProcessControl) -> None:
    prepaid = make_org(stack, "org-p", budget_kind="prepaid", budget_dkk="100")
    await bill(stack, prepaid, prepaid.keys["member"], 3)
    spent = (await budget_seen(stack, prepaid))["spent_dkk"]
    path, token = f"/admin/tenants/{prepaid.tenant}", operator_token(stack)
    r = await stack.client.patch(path, json={"budget_dkk": "150"}, headers=token)  # a top-up keeps the credit prepaid
    assert r.status_code == 200 and r.json()["budget"] == {"kind": "prepaid", "limit_dkk": "150"}, r.text
    seen = await budget_seen(stack, prepaid)
    assert (seen["kind"], seen["limit_dkk"], seen["spent_dkk"]) == ("prepaid", "150", spent)  # spent stays spent
    # The operator ends the credit; the organisation then sets, changes and lifts its own monthly cap.
    r = await stack.client.patch(path, json={"budget_kind": None}, headers=token)
    assert r.status_code == 200 and r.json()["budget"] is None, r.text
    for role, body, budget in (
        ("owner", {"budget_kind": "monthly", "budget_dkk": "50"}, {"kind": "monthly", "limit_dkk": "50"}),
        ("admin", {"budget_dkk": "60"}, {"kind": "monthly", "limit_dkk": "60"}),
        ("admin", {"budget_kind": None}, None),
    ):
        r = await stack.client.patch(path, json=body, headers=bearer(prepaid.keys[role]))
        assert r.status_code == 200 and r.json()["budget"] == budget, (role, body, r.text)
    audit = stack.service.governance.audit_log(OPERATOR, prepaid.tenant)
    updates = [(e["actor"].split(":")[0], e["details"]) for e in reversed(audit) if e["action"] == "tenant.update"]
    assert updates[1:] == [  # after the organisation's set-up: each change, by whom
        ("admin-token", {"budget_dkk": "150"}),
        ("admin-token", {"budget_kind": "None"}),
        ("key", {"budget_kind": "monthly", "budget_dkk": "50"}),
        ("key", {"budget_dkk": "60"}),
        ("key", {"budget_kind": "None"}),
    ]


async def test_per_key_limits_stay_within_the_organisations_ceilings(stack: InProcessControl) -> None:
    a = make_org(stack, "org-a")
    token = operator_token(stack)
    r = await stack.client.patch(f"/admin/tenants/{a.tenant}", json={"max_rpm": 100, "max_tpm": 10000}, headers=token)
    assert r.status_code == 200, r.text
    assert r.json()["ceilings"] == {"max_rpm": 100, "max_tpm": 10000, "max_keys": None}
    keys, spare = f"/admin/tenants/{a.tenant}/keys", f"/admin/keys/{a.spare_key_id}"
    over = [
        ("POST", keys, {"rpm": 101}, "rpm", "100"),
        ("POST", keys, {"tpm": 10001}, "tpm", "10000"),
        ("POST", keys, {"rpm": 100, "tpm": 20000}, "tpm", "10000"),
        ("PATCH", spare, {"rpm": 101}, "rpm", "100"),
        ("PATCH", spare, {"tpm": 10001}, "tpm", "10000"),
    ]
    before = snapshot(stack, a)
    failures: list[str] = []
    for who, headers in (("owner", bearer(a.keys["owner"])), ("admin", bearer(a.keys["admin"])), ("operator", token)):
        for method, path, body, field_name, ceiling in over:
            r = await stack.client.request(method, path, json=body, headers=headers)
            expect(r, 400, "invalid_value", f"{who}: {method} {path} {body}", failures)
            error = r.json()["error"]
            if error["param"] != field_name or ceiling not in error["message"]:
                failures.append(f"{who}: {method} {body}: the error names not `{field_name}` and {ceiling}: {error}")
    # The ceilings themselves are the operator's.
    for role in ("owner", "admin"):
        for body in ({"max_rpm": 1000}, {"max_tpm": None}, {"max_keys": 100}, {"budget_dkk": "5", "max_rpm": 1000}):
            r = await stack.client.patch(f"/admin/tenants/{a.tenant}", json=body, headers=bearer(a.keys[role]))
            expect(r, 403, "permission_denied", f"{role}: {body}", failures)
    assert not failures, "\n".join(failures)
    assert snapshot(stack, a) == before
    # At the ceiling is within it.
    r = await stack.client.post(keys, json={"rpm": 100, "tpm": 10000}, headers=bearer(a.keys["owner"]))
    assert r.status_code == 201 and (r.json()["rpm"], r.json()["tpm"]) == (100, 10000), r.text
    r = await stack.client.patch(spare, json={"rpm": 100}, headers=bearer(a.keys["admin"]))
    assert r.status_code == 200 and r.json()["rpm"] == 100, r.text


async def test_the_key_count_ceiling_holds(stack: InProcessControl) -> None:
    a = make_org(stack, "org-a")
    governance = stack.service.governance
    active = len([k for k in governance.list_keys(OPERATOR, a.tenant) if k.revoked_at is None])
    token, owner = operator_token(stack), bearer(a.keys["owner"])
    r = await stack.client.patch(f"/admin/tenants/{a.tenant}", json={"max_keys": active + 1}, headers=token)
    assert r.status_code == 200 and r.json()["ceilings"]["max_keys"] == active + 1, r.text
    keys = f"/admin/tenants/{a.tenant}/keys"
    assert (await stack.client.post(keys, json={}, headers=owner)).status_code == 201
    before = snapshot(stack, a)
    failures: list[str] = []
    for who, headers in (("owner", owner), ("admin", bearer(a.keys["admin"])), ("operator", token)):
        r = await stack.client.post(keys, json={"name": "one too many"}, headers=headers)
        expect(r, 409, "conflict", f"{who}: a key past the ceiling", failures)
        if r.status_code == 409 and f"at most {active + 1} active keys" not in r.json()["error"]["message"]:
            failures.append(f"{who}: the error does not name the ceiling: {r.text}")
    assert not failures, "\n".join(failures)
    assert snapshot(stack, a) == before
    # A revoked key frees its place; the operator can lift the ceiling.
    assert (await stack.client.delete(f"/admin/keys/{a.spare_key_id}", headers=owner)).status_code == 200
    assert (await stack.client.post(keys, json={}, headers=owner)).status_code == 201
    assert (await stack.client.post(keys, json={}, headers=owner)).status_code == 409
    r = await stack.client.patch(f"/admin/tenants/{a.tenant}", json={"max_keys": None}, headers=token)
    assert r.status_code == 200 and r.json()["ceilings"]["max_keys"] is None, r.text
    assert (await stack.client.post(keys, json={}, headers=owner)).status_code == 201


def test_keys_created_at_once_stop_at_the_key_count_ceiling(tmp_path: Path, db: str | None) -> None:
    """The count and the new key are one transaction with the organisation's row locked: concurrent creations
    (the billing actor runs each in a thread) cannot pass the ceiling together."""
    service = BillingService(BillingSpec(tmp_path, db, {}, default_rpm=600, default_tpm=2_000_000))
    governance = service.governance
    governance.create_tenant(OPERATOR, "org-a", max_keys=3)
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def create() -> None:
        start.wait()
        try:
            governance.create_key(OPERATOR, "org-a")
            outcomes.append("created")
        except Conflict:
            outcomes.append("refused")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
        assert len(governance.list_keys(OPERATOR, "org-a")) == 3
    finally:
        service.ledger.dispose()


async def test_the_effective_rate_limits_respect_the_ceilings(stack: InProcessControl) -> None:
    """A key without limits of its own gets the deployment's (600 requests, 2,000,000 tokens a minute here) capped
    by its organisation's ceilings, and a key whose own limits a lowered ceiling passes gets the ceiling: in the
    billing actor's answer to the replicas (``Principal``) and in every answer's rate-limit headers."""
    a = make_org(stack, "org-a", max_rpm=50, max_tpm=5000)
    governance = stack.service.governance
    _, own = governance.create_key(OPERATOR, a.tenant, rpm=40, tpm=4000)

    async def limits(key: str) -> tuple[str, str]:
        r = await stack.client.get("/v1/models", headers=bearer(key))
        assert r.status_code == 200, r.text
        return r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-limit-tokens"]

    assert await limits(a.keys["member"]) == ("50", "5000")
    assert await limits(own) == ("40", "4000")
    governance.update_tenant(OPERATOR, a.tenant, max_rpm=30, max_tpm=None)
    assert await limits(own) == ("30", "4000")
    assert await limits(a.keys["member"]) == ("30", "2000000")
    principal = await stack.service.authenticate(own)
    assert principal is not None and (principal.rpm, principal.tpm) == (30, 4000)
