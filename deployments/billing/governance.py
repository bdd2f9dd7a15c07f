"""Governance: organisations (tenants) with plans and budgets, members in roles, and their keys, changed only by
callers whose role allows it; the audit log keeps who, what, when of each change, never a key.  # zdr-ok

Roles: ``owner`` and ``admin`` manage their organisation's members, keys, allow-lists, per-key budgets and limits and
its monthly cap (only an owner grants ``owner``); ``member`` calls models; ``viewer`` sees usage only. The operator
(admin token, CLI) may do all, and alone sets what is money or capacity: plans, fees, discounts, prepaid credit, and
the ceilings of an organisation (requests and tokens per minute of any key, active keys), which bind every key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from deployments.billing.pricing import dkk_string, format_dkk, nano_from_dkk
from deployments.billing.tables import AUDIT_LOG, MEMBERS, TENANTS
from deployments.errors import Conflict, InvalidValue, ModelNotAllowed, NotFound, PermissionDenied
from deployments.keys import ROLES, TENANT_PATTERN, KeyRecord, KeyStore

OPERATOR = "operator"
MANAGERS = ("owner", "admin")
CALLERS = ("owner", "admin", "member")
PLANS = ("payg", "monthly")
BUDGET_KINDS = ("monthly", "prepaid")
CEILINGS = ("max_rpm", "max_tpm", "max_keys")
# What only the operator sets of an organisation; prepaid credit too, which is a kind of budget (``_customer_change``).
OPERATOR_SETTINGS = frozenset({"plan", "monthly_fee_dkk", "discount_percent", "display_name", *CEILINGS})
BUDGET_SETTINGS = frozenset({"budget_kind", "budget_dkk"})


@dataclass(frozen=True)
class Actor:
    """Who makes a change: the operator (``tenant`` None, any organisation) or a key acting in its role."""

    name: str
    role: str
    tenant: str | None = None

    @classmethod
    def operator(cls, name: str = OPERATOR) -> Actor:
        return cls(name=name, role=OPERATOR)

    @classmethod
    def of_key(cls, record: KeyRecord) -> Actor:
        return cls(name=f"key:{record.key_id}", role=record.role, tenant=record.tenant)

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR


def can_call_models(role: str) -> bool:
    return role in CALLERS


def model_allowed(allowed: Sequence[str] | None, model: str, region: str) -> bool:
    """A key's allow-list admits a model by served name or by the region it is hosted in (``region:dk``)."""
    return allowed is None or model in allowed or f"region:{region}" in allowed


def check_model_allowed(key: KeyRecord, model: str, region: str) -> None:
    if not model_allowed(key.allowed_models, model, region):
        raise ModelNotAllowed(
            f"This API key may not use the model `{model}`. Your organisation's admin sets which models it may use.",
            "model",
        )


def check_caller_role(key: KeyRecord) -> None:
    if not can_call_models(key.role):
        raise PermissionDenied(f"A key with the role `{key.role}` can read usage but cannot call models.")


def authorize_call(key: KeyRecord, model: str, region: str) -> None:
    """A key may call this served model: its role calls models, and its allow-list has the model."""
    check_caller_role(key)
    check_model_allowed(key, model, region)


def _grantable(actor: Actor, role: str) -> bool:
    if actor.is_operator or actor.role == "owner":
        return True
    return actor.role == "admin" and role != "owner"


MAX_DKK = Decimal(10**9)  # far above any real budget, far below what the database's 64-bit nano-DKK can hold
MAX_PER_MINUTE = 10**9
MAX_KEYS = 10**6
MAX_NAME = 64


def _dkk(value: Any, field: str) -> int | None:
    if value is None:
        return None
    try:
        amount = Decimal(str(value)) if not isinstance(value, (bool, float)) else Decimal(-1)
        if amount > MAX_DKK:
            raise ValueError(field)
        return nano_from_dkk(amount)
    except (ArithmeticError, ValueError):
        raise InvalidValue(
            f"`{field}` must be an amount in DKK from 0 to {MAX_DKK} with at most 9 decimals, written as a string "
            "or an integer.",
            field,
        ) from None


def _percent(basis_points: int) -> str:
    return format((Decimal(basis_points) / 100).normalize(), "f")


def _name(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_NAME):
        raise InvalidValue(f"`name` must be 1-{MAX_NAME} characters.", "name")
    return value


def _now() -> datetime:
    return datetime.now(UTC)


class Governance:
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys
        self._engine = keys.engine

    # -- checks -------------------------------------------------------------------------------------------------

    def _manage(self, actor: Actor, tenant: str) -> None:
        """The actor may manage ``tenant``; someone else's organisation looks like one that does not exist."""
        if actor.is_operator:
            if self._tenant_row(tenant) is None:
                raise NotFound(f"No organisation `{tenant}`.", "tenant")
            return
        if actor.tenant != tenant:
            raise NotFound(f"No organisation `{tenant}`.", "tenant")
        if actor.role not in MANAGERS:
            raise PermissionDenied("Only an owner or admin of the organisation can do this.")

    def _audit(self, actor: Actor, tenant: str | None, action: str, target: str, details: dict[str, Any]) -> None:
        with self._engine.begin() as db:
            db.execute(
                AUDIT_LOG.insert().values(
                    at=_now(),
                    actor=actor.name,
                    tenant=tenant,
                    action=action,
                    target=target,
                    details=json.dumps(details),
                )
            )

    def _tenant_row(self, tenant: str) -> Any:
        with self._engine.connect() as db:
            return db.execute(sa.select(TENANTS).where(TENANTS.c.tenant == tenant)).first()

    # -- tenants ------------------------------------------------------------------------------------------------

    def create_tenant(
        self, actor: Actor, tenant: str, display_name: str | None = None, **settings: Any
    ) -> dict[str, Any]:
        if not actor.is_operator:
            raise PermissionDenied("Only the operator can create organisations.")
        if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
            raise InvalidValue("`tenant` must be 1-64 characters: letters, digits, '.', '_' or '-'.", "tenant")
        if self._tenant_row(tenant) is not None:
            raise Conflict(f"The organisation `{tenant}` exists already.", "tenant")
        with self._engine.begin() as db:
            db.execute(
                TENANTS.insert().values(
                    tenant=tenant,
                    display_name=display_name or tenant,
                    plan="payg",
                    plan_fee_ore=0,
                    discount_bp=0,
                    created_at=_now(),
                )
            )
        self._audit(actor, tenant, "tenant.create", tenant, {"display_name": display_name or tenant})
        return self.update_tenant(actor, tenant, **settings) if settings else self.get_tenant(actor, tenant)

    def update_tenant(self, actor: Actor, tenant: str, **settings: Any) -> dict[str, Any]:
        """Plans, fees, discounts, the name, the ceilings and prepaid credit are the operator's; an owner or admin
        sets, changes or lifts the organisation's monthly cap. A refused change changes nothing, audit log included."""
        self._manage(actor, tenant)
        unknown = set(settings) - OPERATOR_SETTINGS - BUDGET_SETTINGS
        if unknown:
            raise InvalidValue(f"Unknown organisation setting `{sorted(unknown)[0]}`.", sorted(unknown)[0])
        current = self._tenant_row(tenant)
        if not actor.is_operator:
            _customer_change(current, settings)
        values = {**_plan_values(settings), **_ceiling_values(settings)}
        if BUDGET_SETTINGS & set(settings):
            values.update(_budget_values(current, settings))
        with self._engine.begin() as db:
            db.execute(TENANTS.update().where(TENANTS.c.tenant == tenant).values(**values))
        self._audit(actor, tenant, "tenant.update", tenant, {k: str(v) for k, v in settings.items()})
        return self.get_tenant(actor, tenant)

    def get_tenant(self, actor: Actor, tenant: str) -> dict[str, Any]:
        if not actor.is_operator and actor.tenant != tenant:
            raise NotFound(f"No organisation `{tenant}`.", "tenant")
        row = self._tenant_row(tenant)
        if row is None:
            raise NotFound(f"No organisation `{tenant}`.", "tenant")
        return tenant_json(row)

    def list_tenants(self, actor: Actor) -> list[dict[str, Any]]:
        if not actor.is_operator:
            raise PermissionDenied("Only the operator can list organisations.")
        with self._engine.connect() as db:
            return [tenant_json(r) for r in db.execute(sa.select(TENANTS).order_by(TENANTS.c.tenant))]

    # -- members ------------------------------------------------------------------------------------------------

    def add_member(self, actor: Actor, tenant: str, name: str, role: str) -> dict[str, Any]:
        self._manage(actor, tenant)
        if role not in ROLES:
            raise InvalidValue(f"`role` must be one of {', '.join(ROLES)}.", "role")
        if not _grantable(actor, role):
            raise PermissionDenied(f"An {actor.role} cannot grant the role `{role}`.")
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise InvalidValue("`name` must be 1-128 characters.", "name")
        member_id = f"mem_{secrets.token_hex(8)}"
        with self._engine.begin() as db:
            db.execute(
                MEMBERS.insert().values(member_id=member_id, tenant=tenant, name=name, role=role, created_at=_now())
            )
        self._audit(actor, tenant, "member.add", member_id, {"role": role})
        return self._member(tenant, member_id)

    def set_member_role(self, actor: Actor, tenant: str, member_id: str, role: str) -> dict[str, Any]:
        self._manage(actor, tenant)
        current = self._member(tenant, member_id)
        if role not in ROLES:
            raise InvalidValue(f"`role` must be one of {', '.join(ROLES)}.", "role")
        if not _grantable(actor, role) or not _grantable(actor, current["role"]):
            raise PermissionDenied(f"An {actor.role} cannot change an {current['role']} to {role}.")
        with self._engine.begin() as db:
            db.execute(MEMBERS.update().where(MEMBERS.c.member_id == member_id).values(role=role))
        self._audit(actor, tenant, "member.role", member_id, {"from": current["role"], "to": role})
        return self._member(tenant, member_id)

    def remove_member(self, actor: Actor, tenant: str, member_id: str) -> dict[str, Any]:
        """Removes a member; their keys stop working at once (verification joins the member)."""
        self._manage(actor, tenant)
        current = self._member(tenant, member_id)
        if not _grantable(actor, current["role"]):
            raise PermissionDenied(f"An {actor.role} cannot remove an {current['role']}.")
        with self._engine.begin() as db:
            db.execute(MEMBERS.update().where(MEMBERS.c.member_id == member_id).values(removed_at=_now()))
        self._audit(actor, tenant, "member.remove", member_id, {})
        return self._member(tenant, member_id)

    def list_members(self, actor: Actor, tenant: str) -> list[dict[str, Any]]:
        self._manage(actor, tenant)
        with self._engine.connect() as db:
            rows = db.execute(sa.select(MEMBERS).where(MEMBERS.c.tenant == tenant).order_by(MEMBERS.c.created_at))
            return [member_json(r) for r in rows]

    def _member(self, tenant: str, member_id: str) -> dict[str, Any]:
        with self._engine.connect() as db:
            row = db.execute(
                sa.select(MEMBERS).where(MEMBERS.c.member_id == member_id, MEMBERS.c.tenant == tenant)
            ).first()
        if row is None:
            raise NotFound(f"No member `{member_id}` in this organisation.", "member_id")
        return member_json(row)

    # -- keys ---------------------------------------------------------------------------------------------------

    def create_key(
        self,
        actor: Actor,
        tenant: str,
        *,
        role: str = "member",
        member_id: str | None = None,
        name: str | None = None,
        allowed_models: Sequence[str] | None = None,
        budget_dkk: Any = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key, returned once. The operator may create a key for a new organisation (it is created)."""
        if not (actor.is_operator and self._tenant_row(tenant) is None):
            self._manage(actor, tenant)
        if member_id is not None:
            role = self._member(tenant, member_id)["role"]
        if role not in ROLES:
            raise InvalidValue(f"`role` must be one of {', '.join(ROLES)}.", "role")
        if not _grantable(actor, role):
            raise PermissionDenied(f"An {actor.role} cannot create a key with the role `{role}`.")
        _check_limits(self._tenant_row(tenant), {"rpm": rpm, "tpm": tpm})
        try:
            record, key = self._keys.create(
                tenant,
                role,
                name=_name(name),
                member_id=member_id,
                allowed_models=_models(allowed_models),
                budget_nano_dkk=_dkk(budget_dkk, "budget_dkk"),
                rpm=rpm,
                tpm=tpm,
            )
        except ValueError as exc:
            raise InvalidValue(str(exc)) from None
        self._audit(actor, tenant, "key.create", record.key_id, _key_details(record))
        return record, key

    def update_key(self, actor: Actor, key_id: str, **settings: Any) -> KeyRecord:
        record = self._own_key(actor, key_id)
        changes: dict[str, Any] = {}
        for field, value in settings.items():
            if field == "budget_dkk":
                changes["budget_nano_dkk"] = _dkk(value, "budget_dkk")
            elif field == "allowed_models":
                changes["allowed_models"] = _models(value)
            elif field in ("rpm", "tpm"):
                changes[field] = value
            elif field == "name":
                changes["name"] = _name(value)
            elif field == "role":
                if record.member_id is not None:
                    raise InvalidValue("This key acts in its member's role: change the member's role.", "role")
                if value not in ROLES or not _grantable(actor, value) or not _grantable(actor, record.role):
                    raise PermissionDenied(f"An {actor.role} cannot give this key the role `{value}`.")
                changes["role"] = value
            else:
                raise InvalidValue(f"Unknown key setting `{field}`.", field)
        _check_limits(self._tenant_row(record.tenant), {f: changes[f] for f in ("rpm", "tpm") if f in changes})
        try:
            updated = self._keys.update(key_id, **changes)
        except ValueError as exc:
            raise InvalidValue(str(exc)) from None
        assert updated is not None
        self._audit(actor, record.tenant, "key.update", key_id, _key_details(updated))
        return updated

    def revoke_key(self, actor: Actor, key_id: str) -> KeyRecord:
        record = self._own_key(actor, key_id)
        if not self._keys.revoke(key_id):
            raise NotFound(f"The key `{key_id}` is revoked already.", "key_id")
        self._audit(actor, record.tenant, "key.revoke", key_id, {})
        revoked = self._keys.get(key_id)
        assert revoked is not None
        return revoked

    def list_keys(self, actor: Actor, tenant: str | None) -> list[KeyRecord]:
        if tenant is None:
            if not actor.is_operator:
                raise PermissionDenied("Only the operator can list every organisation's keys.")
            return self._keys.list(None)
        self._manage(actor, tenant)
        return self._keys.list(tenant)

    def _own_key(self, actor: Actor, key_id: str) -> KeyRecord:
        record = self._keys.get(key_id)
        if record is None or (not actor.is_operator and record.tenant != actor.tenant):
            raise NotFound(f"No key `{key_id}`.", "key_id")
        self._manage(actor, record.tenant)
        if not _grantable(actor, record.role):
            raise PermissionDenied(f"An {actor.role} cannot change an {record.role}'s key.")
        return record

    # -- audit --------------------------------------------------------------------------------------------------

    def audit_log(self, actor: Actor, tenant: str | None, limit: int = 100) -> list[dict[str, Any]]:
        if tenant is None and not actor.is_operator:
            raise PermissionDenied("Only the operator can read every organisation's audit log.")
        if tenant is not None:
            self._manage(actor, tenant)
        query = sa.select(AUDIT_LOG).order_by(AUDIT_LOG.c.id.desc()).limit(max(1, min(limit, 1000)))
        if tenant is not None:
            query = query.where(AUDIT_LOG.c.tenant == tenant)
        with self._engine.connect() as db:
            return [
                {
                    "id": r.id,
                    "object": "audit_log.entry",
                    "at": _iso(r.at),
                    "actor": r.actor,
                    "tenant": r.tenant,
                    "action": r.action,
                    "target": r.target,
                    "details": json.loads(r.details),
                }
                for r in db.execute(query)
            ]


def _models(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise InvalidValue(
            "`allowed_models` must be a list of model names or `region:<name>` entries.", "allowed_models"
        )
    return value


def _whole(value: Any, field: str, high: int, null_means: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
        raise InvalidValue(f"`{field}` must be an integer from 1 to {high} (or null for {null_means}).", field)
    return value


def _check_limits(tenant: Any, limits: dict[str, Any]) -> None:
    """A key's own ``rpm`` and ``tpm``: within its organisation's ceilings (``tenant``'s row; None for a new one)."""
    for field, value in limits.items():
        _whole(value, field, MAX_PER_MINUTE, "no limit")
        ceiling = None if tenant is None else getattr(tenant, f"max_{field}")
        if value is not None and ceiling is not None and value > ceiling:
            raise InvalidValue(
                f"`{field}` may be at most {ceiling}, the ceiling the operator set for this organisation.", field
            )


def _customer_change(current: Any, settings: dict[str, Any]) -> None:
    """What an owner or admin may change of its organisation: its monthly cap, and only while it has no prepaid
    credit (replacing or lifting the credit would give the organisation money the operator did not)."""
    if OPERATOR_SETTINGS & set(settings):
        raise PermissionDenied("Plans, fees, discounts, names and ceilings are set by the operator.")
    if current.budget_kind == "prepaid" or settings.get("budget_kind") == "prepaid":
        raise PermissionDenied(
            "Prepaid credit is set and topped up by the operator; an owner or admin can set a monthly cap of an "
            "organisation without prepaid credit."
        )


def _plan_values(settings: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "display_name" in settings:
        name = settings["display_name"]
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise InvalidValue("`display_name` must be 1-128 characters.", "display_name")
        values["display_name"] = name
    if "plan" in settings:
        if settings["plan"] not in PLANS:
            raise InvalidValue("`plan` must be `payg` or `monthly`.", "plan")
        values["plan"] = settings["plan"]
    if "monthly_fee_dkk" in settings:
        fee = _dkk(settings["monthly_fee_dkk"], "monthly_fee_dkk") or 0
        if fee % 10**7:
            raise InvalidValue("`monthly_fee_dkk` must be whole øre.", "monthly_fee_dkk")
        values["plan_fee_ore"] = fee // 10**7
    if "discount_percent" in settings:
        try:
            discount = Decimal(str(settings["discount_percent"]))
        except ArithmeticError:
            discount = Decimal(-1)
        if not Decimal(0) <= discount <= Decimal(100) or (discount * 100) % 1:
            raise InvalidValue("`discount_percent` must be 0-100 with at most 2 decimals.", "discount_percent")
        values["discount_bp"] = int(discount * 100)
    return values


def _budget_values(current: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The budget's kind and amount; an amount without a kind keeps the kind it has (a top-up of prepaid credit
    stays prepaid), or is a monthly cap."""
    kind = settings.get("budget_kind")
    amount = _dkk(settings.get("budget_dkk"), "budget_dkk")
    if kind is None and amount is not None:
        kind = current.budget_kind or "monthly"
    if kind is not None and kind not in BUDGET_KINDS:
        raise InvalidValue("`budget_kind` must be `monthly` or `prepaid` (or null for no budget).", "budget_kind")
    if kind is not None and amount is None:
        raise InvalidValue("A budget needs `budget_dkk`.", "budget_dkk")
    return {"budget_kind": kind, "budget_nano_dkk": amount}


def _ceiling_values(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        field: _whole(settings[field], field, MAX_KEYS if field == "max_keys" else MAX_PER_MINUTE, "no ceiling")
        for field in CEILINGS
        if field in settings
    }


def _key_details(record: KeyRecord) -> dict[str, Any]:
    details = record.public()
    return {k: details[k] for k in ("role", "member_id", "allowed_models", "budget_nano_dkk", "rpm", "tpm")}


def _iso(moment: datetime) -> str:
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


PAYG_PLAN = {"name": "payg", "monthly_fee_dkk": "0.00", "discount_percent": "0"}


def plan_json(row: Any) -> dict[str, Any]:
    """A tenant's plan as the admin API and the usage summary show it (None: a tenant without a row pays as it goes)."""
    if row is None:
        return dict(PAYG_PLAN)
    return {
        "name": row.plan,
        "monthly_fee_dkk": format_dkk(row.plan_fee_ore),
        "discount_percent": _percent(row.discount_bp),
    }


def tenant_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.tenant,
        "object": "organization",
        "display_name": row.display_name,
        "plan": plan_json(row),
        "budget": None
        if row.budget_kind is None
        else {"kind": row.budget_kind, "limit_dkk": dkk_string(row.budget_nano_dkk)},
        "ceilings": {field: getattr(row, field) for field in CEILINGS},
        "created_at": _iso(row.created_at),
    }


def member_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.member_id,
        "object": "organization.member",
        "tenant": row.tenant,
        "name": row.name,
        "role": row.role,
        "created_at": _iso(row.created_at),
        "removed_at": _iso(row.removed_at) if row.removed_at is not None else None,
    }


def key_json(record: KeyRecord) -> dict[str, Any]:
    body = record.public()
    budget = body.pop("budget_nano_dkk")
    body["budget_dkk"] = dkk_string(budget) if budget is not None else None
    return body
