"""API keys: creation, keyed-hash storage in Anker's database, and constant-time verification.

The plaintext key is returned once by ``create`` and never stored or logged; only HMAC-SHA256(server secret, key)
is kept, in the ``api_keys`` table that an Alembic migration creates, with the key's role, allow-list, budget and
rate limits; a key is created only within its organisation's ceiling on active keys. Permission checks and the audit
log are the governance layer's (``deployments/billing/governance.py``).

A key ends in a tag: a keyed hash of the rest of it (HMAC-SHA256 under the *tag key*, itself derived from the server
secret). A process that holds the tag key (billing hands it to the engine replicas and the control application with
the ids of the keys made before keys carried a tag: ``deployments/contracts.py::KeyCheck``) tells a mistyped or
made-up key from one that may be valid in process, without asking billing: forging a tag takes the tag key. The tag
key cannot make a key that verifies: that takes the random secret part, whose digest only billing holds.

Keys made before keys carried a tag (with a CRC32 checksum, or with nothing) remain valid. No new one is made, so
their ids are a set that only shrinks; a key of their shape whose id is not in it is refused in process too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import string
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deployments import database
from deployments.billing.tables import API_KEYS, MEMBERS, TENANTS
from deployments.errors import Conflict

KEY_PREFIX = "ank"
# ank_<key id: 12 hex>_<secret: 43 url-safe base64 chars = 256 bits><tag: 11 base62 digits = 64 bits>; keys made
# before keys carried a tag end in a 6-digit CRC32 checksum instead, or in nothing.
KEY_PATTERN = re.compile(r"^ank_([0-9a-f]{12})_([A-Za-z0-9_-]{43})([0-9A-Za-z]{11}|[0-9A-Za-z]{6})?$")
_BODY_LENGTH = len("ank_") + 12 + len("_") + 43
TAG_DIGITS = 11
CHECKSUM_DIGITS = 6
_TAG_BYTES = 8
_TAG_KEY_LABEL = b"anker api key tag v1"
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
# The operator's admin token (``deployments/billing/service.py::load_or_create_admin_token``): no key has its shape.
ADMIN_TOKEN_PATTERN = re.compile(r"^ank_admin_[0-9a-f]{64,}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

ROLES = ("owner", "admin", "member", "viewer")
MAX_ALLOWED_MODELS = 64


@dataclass(frozen=True)
class KeyRecord:
    """A key's settings (never the key): its tenant, effective role, model allow-list, monthly budget, rate limits.

    ``allowed_models`` holds served names and ``region:<r>`` entries; None means every model. ``role`` is the
    role of the member the key belongs to, or the key's own role for keys made without a member. ``ceiling_rpm``
    and ``ceiling_tpm`` are its organisation's ceilings, set by the operator, as they were when the key was read.
    """

    key_id: str
    tenant: str
    created_at: float
    revoked_at: float | None = None
    role: str = "member"
    name: str | None = None
    member_id: str | None = None
    allowed_models: tuple[str, ...] | None = None
    budget_nano_dkk: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    ceiling_rpm: int | None = None
    ceiling_tpm: int | None = None

    def limits(self, default_rpm: int, default_tpm: int) -> tuple[int, int]:
        """Requests and tokens per minute the key may use: its own, or the deployment's defaults, never above its
        organisation's ceilings (a ceiling lowered after a key's limit was set caps that limit too)."""
        return _capped(self.rpm or default_rpm, self.ceiling_rpm), _capped(self.tpm or default_tpm, self.ceiling_tpm)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "object": "api_key",
            "tenant": self.tenant,
            "name": self.name,
            "member_id": self.member_id,
            "role": self.role,
            "allowed_models": list(self.allowed_models) if self.allowed_models is not None else None,
            "budget_nano_dkk": self.budget_nano_dkk,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "created_at": int(self.created_at),
            "revoked_at": int(self.revoked_at) if self.revoked_at is not None else None,
        }


def _capped(limit: int, ceiling: int | None) -> int:
    return limit if ceiling is None else min(limit, ceiling)


def _validate_settings(
    role: str, allowed_models: Sequence[str] | None, budget_nano_dkk: int | None, rpm: int | None, tpm: int | None
) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if allowed_models is not None and (
        len(allowed_models) > MAX_ALLOWED_MODELS
        or not all(isinstance(m, str) and 0 < len(m) <= 128 for m in allowed_models)
    ):
        raise ValueError(f"allowed_models must be up to {MAX_ALLOWED_MODELS} model names or region:<name> entries")
    for name, value in (("budget", budget_nano_dkk), ("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 0:
            raise ValueError(f"{name} cannot be negative")


def _with_member() -> sa.Select[Any]:
    """Keys with their member's current role and removal (a key acts in its member's role) and their organisation's
    rate-limit ceilings."""
    return sa.select(
        API_KEYS,
        MEMBERS.c.role.label("member_role"),
        MEMBERS.c.removed_at.label("member_removed"),
        TENANTS.c.max_rpm.label("ceiling_rpm"),
        TENANTS.c.max_tpm.label("ceiling_tpm"),
    ).select_from(
        API_KEYS.outerjoin(MEMBERS, MEMBERS.c.member_id == API_KEYS.c.member_id).outerjoin(
            TENANTS, TENANTS.c.tenant == API_KEYS.c.tenant
        )
    )


def _record(row: Any, role: str | None = None) -> KeyRecord:
    allowed = json.loads(row.allowed_models) if row.allowed_models is not None else None
    return KeyRecord(
        key_id=row.key_id,
        tenant=row.tenant,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        role=role or row.role,
        name=row.name,
        member_id=row.member_id,
        allowed_models=tuple(allowed) if allowed is not None else None,
        budget_nano_dkk=row.budget_nano_dkk,
        rpm=row.rpm,
        tpm=row.tpm,
        ceiling_rpm=row.ceiling_rpm,
        ceiling_tpm=row.ceiling_tpm,
    )


def _base62(value: int, digits: int) -> str:
    text = ""
    for _ in range(digits):
        value, digit = divmod(value, len(_BASE62))
        text = _BASE62[digit] + text
    return text


def checksummed(body: str) -> str:
    """``body`` (``ank_<id>_<secret>``) with a CRC32 checksum in base62 digits, as keys were made before they
    carried a tag."""
    return body + _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_DIGITS)


def tag_key_of(secret: bytes) -> bytes:
    """The tag key derived from the server secret: it checks and makes tags, and nothing else can be had from it."""
    return hmac.new(secret, _TAG_KEY_LABEL, hashlib.sha256).digest()


def tagged(body: str, tag_key: bytes) -> str:
    """``body`` (``ank_<id>_<secret>``) with its tag: the first 64 bits of its HMAC under ``tag_key``, in base62."""
    mac = hmac.new(tag_key, body.encode("ascii"), hashlib.sha256).digest()
    return body + _base62(int.from_bytes(mac[:_TAG_BYTES], "big"), TAG_DIGITS)


def key_id_of(key: str) -> str | None:
    """The key id of a string shaped like a key whose CRC32 checksum, if it has one, is right; None for anything
    else. Its tag, if it has one, takes the tag key to check (``KeyCheck``). Whether the key exists is billing's to
    say."""
    match = KEY_PATTERN.fullmatch(key)
    if match is None:
        return None
    end = match.group(3)
    if end is not None and len(end) == CHECKSUM_DIGITS and checksummed(key[:-CHECKSUM_DIGITS]) != key:
        return None
    return match.group(1)


def tag_matches(key: str, tag_key: bytes) -> bool:
    """Whether ``key`` is shaped like a key that carries a tag, and its tag is right under ``tag_key``."""
    return len(key) == _BODY_LENGTH + TAG_DIGITS and hmac.compare_digest(tagged(key[:-TAG_DIGITS], tag_key), key)


def carries_tag(key: str) -> bool:
    """Whether ``key`` (shaped like a key) is of the shape that carries a tag, not of an older one."""
    return len(key) == _BODY_LENGTH + TAG_DIGITS


class MissingSecret(RuntimeError):
    """A secret that must be provided (a mounted Kubernetes Secret) is not there."""


def load_or_create_secret(path: Path, create: bool = True) -> bytes:
    """A server secret: 32 random bytes or more in a 0600 file, created on first use unless ``create`` is False
    (a folder the operator provides, such as a mounted Kubernetes Secret, is never written to)."""
    if not create:
        try:
            return _checked_secret(path, path.read_bytes())
        except FileNotFoundError:
            raise MissingSecret(
                f"secret {path.name} is missing from the secrets folder {path.parent} (secrets_dir, "
                "ANKER_SECRETS_DIR): create it, e.g. as a key of the Kubernetes Secret mounted there"
            ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _checked_secret(path, path.read_bytes())
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


def _checked_secret(path: Path, secret: bytes) -> bytes:
    if len(secret) < 32:
        raise ValueError(f"secret {path} is shorter than 32 bytes")
    return secret


class KeyStore:
    """Keys in the database. Synchronous on purpose: the ingress calls it from a worker thread, the CLI directly."""

    def __init__(self, engine: sa.Engine, secret: bytes) -> None:
        self._engine = engine
        self._secret = secret
        self._tag_key = tag_key_of(secret)

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("ascii"), hashlib.sha256).digest()

    def create(
        self,
        tenant: str,
        role: str = "member",
        *,
        name: str | None = None,
        member_id: str | None = None,
        allowed_models: Sequence[str] | None = None,
        budget_nano_dkk: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key for ``tenant`` (created as a pay-as-you-go organisation if it is new); returns it once.

        Refused (``Conflict``) when the organisation has as many active keys as its ceiling allows: counted and
        created in one transaction with the organisation's row locked, so keys created at once cannot pass it."""
        if not TENANT_PATTERN.match(tenant):
            raise ValueError("tenant must be 1-64 characters: letters, digits, '.', '_' or '-'")
        _validate_settings(role, allowed_models, budget_nano_dkk, rpm, tpm)
        key_id = secrets.token_hex(6)
        key = tagged(f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}", self._tag_key)
        record = KeyRecord(
            key_id=key_id,
            tenant=tenant,
            created_at=time.time(),
            role=role,
            name=name,
            member_id=member_id,
            allowed_models=tuple(allowed_models) if allowed_models is not None else None,
            budget_nano_dkk=budget_nano_dkk,
            rpm=rpm,
            tpm=tpm,
        )
        with self._engine.begin() as db:
            ensure_tenant(db, tenant)
            ceilings = _locked_ceilings(db, tenant)
            record = replace(record, ceiling_rpm=ceilings.max_rpm, ceiling_tpm=ceilings.max_tpm)
            if member_id is not None:
                member = db.execute(
                    sa.select(MEMBERS.c.role).where(
                        MEMBERS.c.member_id == member_id, MEMBERS.c.tenant == tenant, MEMBERS.c.removed_at.is_(None)
                    )
                ).first()
                if member is None:
                    raise ValueError(f"no member {member_id} in tenant {tenant}")
                record = replace(record, role=member.role)
            db.execute(
                API_KEYS.insert().values(
                    key_id=record.key_id,
                    tenant=record.tenant,
                    key_hmac=self._digest(key),
                    tagged=True,
                    created_at=record.created_at,
                    role=role,
                    name=name,
                    member_id=member_id,
                    allowed_models=json.dumps(list(allowed_models)) if allowed_models is not None else None,
                    budget_nano_dkk=budget_nano_dkk,
                    rpm=rpm,
                    tpm=tpm,
                )
            )
        return record, key

    def verify(self, key: str) -> KeyRecord | None:
        """The key's record if the key is valid and not revoked (nor its member removed); None otherwise.

        Constant time in the secret part: an unknown id costs the same digest comparison as a wrong secret.
        """
        key_id = key_id_of(key)
        if key_id is None or (carries_tag(key) and not tag_matches(key, self._tag_key)):
            return None
        query = _with_member().where(API_KEYS.c.key_id == key_id)
        with self._engine.connect() as db:
            row = db.execute(query).first()
        if row is None:
            hmac.compare_digest(self._digest(key), bytes(32))
            return None
        valid = hmac.compare_digest(self._digest(key), bytes(row.key_hmac))
        if not valid or row.revoked_at is not None or row.member_removed is not None:
            return None
        if row.member_id is not None and row.member_role is None:
            return None
        return _record(row, row.member_role)

    @property
    def tag_key(self) -> bytes:
        return self._tag_key

    def untagged_key_ids(self) -> frozenset[str]:
        """The ids of the keys made before keys carried a tag that are not revoked."""
        query = sa.select(API_KEYS.c.key_id).where(API_KEYS.c.tagged.is_(False), API_KEYS.c.revoked_at.is_(None))
        with self._engine.connect() as db:
            return frozenset(db.execute(query).scalars())

    def get(self, key_id: str) -> KeyRecord | None:
        query = _with_member().where(API_KEYS.c.key_id == key_id)
        with self._engine.connect() as db:
            row = db.execute(query).first()
        return _record(row, row.member_role) if row is not None else None

    def list(self, tenant: str | None = None) -> list[KeyRecord]:
        query = _with_member()
        if tenant is not None:
            query = query.where(API_KEYS.c.tenant == tenant)
        with self._engine.connect() as db:
            rows = db.execute(query.order_by(API_KEYS.c.created_at)).all()
        return [_record(r, r.member_role) for r in rows]

    def update(self, key_id: str, **settings: Any) -> KeyRecord | None:
        """Changes a key's ``role``, ``name``, ``allowed_models``, ``budget_nano_dkk``, ``rpm`` or ``tpm``."""
        current = self.get(key_id)
        if current is None:
            return None
        unknown = set(settings) - {"role", "name", "allowed_models", "budget_nano_dkk", "rpm", "tpm"}
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        merged = {
            "role": current.role,
            "allowed_models": current.allowed_models,
            "budget_nano_dkk": current.budget_nano_dkk,
            "rpm": current.rpm,
            "tpm": current.tpm,
            **settings,
        }
        _validate_settings(
            merged["role"], merged["allowed_models"], merged["budget_nano_dkk"], merged["rpm"], merged["tpm"]
        )
        values = dict(settings)
        if "allowed_models" in values:
            models = values["allowed_models"]
            values["allowed_models"] = json.dumps(list(models)) if models is not None else None
        with self._engine.begin() as db:
            db.execute(API_KEYS.update().where(API_KEYS.c.key_id == key_id).values(**values))
        return self.get(key_id)

    def revoke(self, key_id: str) -> bool:
        with self._engine.begin() as db:
            result = db.execute(
                API_KEYS.update()
                .where(API_KEYS.c.key_id == key_id, API_KEYS.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        return result.rowcount == 1

    def count_active(self) -> int:
        with self._engine.connect() as db:
            count = db.execute(sa.select(sa.func.count()).where(API_KEYS.c.revoked_at.is_(None))).scalar()
        return int(count or 0)

    @property
    def engine(self) -> sa.Engine:
        return self._engine


def _locked_ceilings(db: sa.Connection, tenant: str) -> Any:
    """The organisation's ceilings, its row locked until the transaction ends; refuses a key past ``max_keys``."""
    ceilings = db.execute(
        sa.select(TENANTS.c.max_rpm, TENANTS.c.max_tpm, TENANTS.c.max_keys)
        .where(TENANTS.c.tenant == tenant)
        .with_for_update()
    ).one()
    if ceilings.max_keys is not None:
        active = db.execute(
            sa.select(sa.func.count()).where(API_KEYS.c.tenant == tenant, API_KEYS.c.revoked_at.is_(None))
        ).scalar()
        if int(active or 0) >= ceilings.max_keys:
            raise Conflict(
                f"This organisation may have at most {ceilings.max_keys} active keys. Revoke one, or ask the "
                "operator to raise the ceiling."
            )
    return ceilings


def ensure_tenant(db: sa.Connection, tenant: str) -> None:
    """Creates ``tenant`` as a pay-as-you-go organisation without a budget unless it exists."""
    from datetime import UTC, datetime

    exists = db.execute(sa.select(TENANTS.c.tenant).where(TENANTS.c.tenant == tenant)).first()
    if exists is None:
        db.execute(
            TENANTS.insert().values(
                tenant=tenant,
                display_name=tenant,
                plan="payg",
                plan_fee_ore=0,
                discount_bp=0,
                created_at=datetime.now(UTC),
            )
        )


def secret_path(secrets_dir: Path) -> Path:
    return secrets_dir / "hmac.key"


def open_key_store(
    data_dir: Path, database_url: str | None = None, migrate: bool = True, secrets_dir: Path | None = None
) -> KeyStore:
    """The key store of a deployment: Anker's database (the data folder's SQLite file unless ``database_url`` says
    otherwise) and the HMAC secret, in ``secrets_dir`` if given (read only there), else in the data folder's
    ``secrets/`` (made on first use). Brings the schema up to date first unless told not to."""
    engine = database.create_engine(database.database_url(data_dir, database_url))
    if migrate:
        database.migrate(engine)
    folder = secrets_dir if secrets_dir is not None else data_dir / "secrets"
    return KeyStore(engine, load_or_create_secret(secret_path(folder), create=secrets_dir is None))
