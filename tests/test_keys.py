"""API keys: shown once, stored only as a keyed hash, verified in constant time, revocable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from deployments.keys import KEY_PATTERN, open_key_store
from tests.inprocess import clean_postgres


def test_create_verify_revoke(tmp_path: Path) -> None:
    store = open_key_store(tmp_path)
    record, key = store.create("kommune-aarhus")
    assert KEY_PATTERN.match(key) and key.startswith("ank_")
    assert store.verify(key) == record
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.verify("ank_000000000000_" + "x" * 43) is None
    assert store.verify("not-a-key") is None
    assert store.revoke(record.key_id) and store.verify(key) is None
    assert not store.revoke(record.key_id)


def test_only_a_keyed_hash_is_stored(tmp_path: Path) -> None:
    store = open_key_store(tmp_path)
    _, key = store.create("t")
    dump = "\n".join(sqlite3.connect(tmp_path / "anker.db").iterdump())
    assert "api_keys" in dump
    secret_part = key.split("_", 2)[2]  # the secret is base64url: it may hold "_" itself
    assert secret_part not in dump and key not in dump
    assert (tmp_path / "secrets" / "hmac.key").stat().st_mode & 0o077 == 0


def test_keys_are_distinct_and_listed(tmp_path: Path) -> None:
    store = open_key_store(tmp_path)
    keys = {store.create("a")[1] for _ in range(20)}
    assert len(keys) == 20
    assert len(store.list("a")) == 20 and store.list("b") == [] and store.count_active() == 20


def test_a_new_store_on_the_same_folder_verifies_old_keys(tmp_path: Path) -> None:
    _, key = open_key_store(tmp_path).create("a")
    assert open_key_store(tmp_path).verify(key) is not None


def test_keys_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    url = clean_postgres(postgres_url)  # the session's server: other tests' keys are not this test's
    store = open_key_store(tmp_path, url.replace("postgresql+psycopg://", "postgresql://"))
    record, key = store.create("kommune-y")
    assert store.verify(key) == record and store.count_active() == 1
    assert store.revoke(record.key_id) and store.verify(key) is None


@pytest.mark.parametrize("tenant", ["", "a b", "x" * 65, "../etc"])
def test_bad_tenant_names_are_refused(tmp_path: Path, tenant: str) -> None:
    with pytest.raises(ValueError):
        open_key_store(tmp_path).create(tenant)
