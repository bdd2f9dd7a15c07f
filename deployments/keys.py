"""API keys: creation, keyed-hash storage in Anker's database, and constant-time verification.

The plaintext key is returned once by ``create`` and never stored or logged; only HMAC-SHA256(server secret, key)
is kept, in the ``api_keys`` table that an Alembic migration creates. The next steps of issue 4 move look-ups behind
the billing actor; the key format stays.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from deployments import database

KEY_PREFIX = "ank"
# ank_<key id: 12 hex>_<secret: 43 url-safe base64 chars = 256 bits>
KEY_PATTERN = re.compile(r"^ank_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

API_KEYS = sa.Table(
    "api_keys",
    sa.MetaData(),
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_hmac", sa.LargeBinary(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    created_at: float
    revoked_at: float | None = None


def load_or_create_secret(path: Path) -> bytes:
    """The server's HMAC secret: 32 random bytes in a 0600 file, created on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"HMAC secret {path} is shorter than 32 bytes") from None
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


class KeyStore:
    """Keys in the database. Synchronous on purpose: the ingress calls it from a worker thread, the CLI directly."""

    def __init__(self, engine: sa.Engine, secret: bytes) -> None:
        self._engine = engine
        self._secret = secret

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("ascii"), hashlib.sha256).digest()

    def create(self, tenant: str) -> tuple[KeyRecord, str]:
        if not TENANT_PATTERN.match(tenant):
            raise ValueError("tenant must be 1-64 characters: letters, digits, '.', '_' or '-'")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(key_id=key_id, tenant=tenant, created_at=time.time())
        with self._engine.begin() as db:
            db.execute(
                API_KEYS.insert().values(
                    key_id=record.key_id, tenant=record.tenant, key_hmac=self._digest(key), created_at=record.created_at
                )
            )
        return record, key

    def verify(self, key: str) -> KeyRecord | None:
        """The key's record if the key is valid and not revoked; None otherwise. Constant time in the secret part."""
        match = KEY_PATTERN.match(key)
        if match is None:
            return None
        with self._engine.connect() as db:
            row = db.execute(sa.select(API_KEYS).where(API_KEYS.c.key_id == match.group(1))).first()
        if row is None:
            # Compare anyway, so that an unknown id costs the same as a wrong secret.
            hmac.compare_digest(self._digest(key), bytes(32))
            return None
        valid = hmac.compare_digest(self._digest(key), bytes(row.key_hmac))
        if not valid or row.revoked_at is not None:
            return None
        return KeyRecord(key_id=row.key_id, tenant=row.tenant, created_at=row.created_at, revoked_at=row.revoked_at)

    def list(self, tenant: str | None = None) -> list[KeyRecord]:
        query = sa.select(API_KEYS.c.key_id, API_KEYS.c.tenant, API_KEYS.c.created_at, API_KEYS.c.revoked_at)
        if tenant is not None:
            query = query.where(API_KEYS.c.tenant == tenant)
        with self._engine.connect() as db:
            rows = db.execute(query.order_by(API_KEYS.c.created_at)).all()
        return [KeyRecord(key_id=r[0], tenant=r[1], created_at=r[2], revoked_at=r[3]) for r in rows]

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


def secret_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "hmac.key"


def open_key_store(data_dir: Path, database_url: str | None = None, migrate: bool = True) -> KeyStore:
    """The key store of a deployment: Anker's database (the data folder's SQLite file unless ``database_url`` says
    otherwise) and the HMAC secret in the data folder. Brings the schema up to date first unless told not to."""
    engine = database.create_engine(database.database_url(data_dir, database_url))
    if migrate:
        database.migrate(engine)
    return KeyStore(engine, load_or_create_secret(secret_path(data_dir)))
