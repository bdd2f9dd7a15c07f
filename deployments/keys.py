"""API keys: creation, keyed-hash storage in the local SQLite database, and constant-time verification.

The plaintext key is returned once by ``create`` and never stored or logged; only HMAC-SHA256(server secret, key)
is kept. The next issue (tenants and billing) moves this behind the billing actor; the key format stays.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "ank"
# ank_<key id: 12 hex>_<secret: 43 url-safe base64 chars = 256 bits>
KEY_PATTERN = re.compile(r"^ank_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    key_hmac    BLOB NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant);
"""


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
    """Keys in SQLite. Synchronous on purpose: the ingress calls it from a worker thread, the CLI directly."""

    def __init__(self, database: Path, secret: bytes) -> None:
        self._database = database
        self._secret = secret
        database.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._database, timeout=10.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("ascii"), hashlib.sha256).digest()

    def create(self, tenant: str) -> tuple[KeyRecord, str]:
        if not TENANT_PATTERN.match(tenant):
            raise ValueError("tenant must be 1-64 characters: letters, digits, '.', '_' or '-'")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(key_id=key_id, tenant=tenant, created_at=time.time())
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys (key_id, tenant, key_hmac, created_at) VALUES (?, ?, ?, ?)",
                (record.key_id, record.tenant, self._digest(key), record.created_at),
            )
        return record, key

    def verify(self, key: str) -> KeyRecord | None:
        """The key's record if the key is valid and not revoked; None otherwise. Constant time in the secret part."""
        match = KEY_PATTERN.match(key)
        if match is None:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT key_id, tenant, key_hmac, created_at, revoked_at FROM api_keys WHERE key_id = ?",
                (match.group(1),),
            ).fetchone()
        if row is None:
            # Compare anyway, so that an unknown id costs the same as a wrong secret.
            hmac.compare_digest(self._digest(key), bytes(32))
            return None
        valid = hmac.compare_digest(self._digest(key), bytes(row[2]))
        if not valid or row[4] is not None:
            return None
        return KeyRecord(key_id=row[0], tenant=row[1], created_at=row[3], revoked_at=row[4])

    def list(self, tenant: str | None = None) -> list[KeyRecord]:
        query = "SELECT key_id, tenant, created_at, revoked_at FROM api_keys"
        params: tuple[str, ...] = ()
        if tenant is not None:
            query += " WHERE tenant = ?"
            params = (tenant,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at", params).fetchall()
        return [KeyRecord(key_id=r[0], tenant=r[1], created_at=r[2], revoked_at=r[3]) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
        return cursor.rowcount == 1

    def count_active(self) -> int:
        with self._connect() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()
        return int(count)


def key_store_paths(data_dir: Path) -> tuple[Path, Path]:
    """Where a data folder keeps its keys: the SQLite database and the HMAC secret."""
    return data_dir / "anker.db", data_dir / "secrets" / "hmac.key"


def open_key_store(data_dir: Path) -> KeyStore:
    database, secret_file = key_store_paths(data_dir)
    return KeyStore(database, load_or_create_secret(secret_file))
