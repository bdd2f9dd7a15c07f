"""API keys: shown once, stored only as a keyed hash, verified in constant time, revocable; a checksum that tells a
made-up key in process, and keys made before it still valid."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest

from config.settings import DEFAULT_PROFILE, load_config
from deployments.billing.service import BillingService, billing_spec, load_or_create_admin_token
from deployments.billing.tables import API_KEYS
from deployments.keys import ADMIN_TOKEN_PATTERN, KEY_PATTERN, MissingSecret, key_id_of, open_key_store
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


def _billing_in_a_pod(data_dir: Path, database_url: str, secrets_dir: Path) -> BillingService:
    """The billing deployment's service as a KubeRay pod starts it: the profile, the database and the secrets
    folder from the pod's environment (the Secret mounted there), and its own, fresh data folder."""
    environ = {
        "ANKER_DATA_DIR": str(data_dir),
        "ANKER_DATABASE_URL": database_url,
        "ANKER_SECRETS_DIR": str(secrets_dir),
    }
    return BillingService(billing_spec(load_config(DEFAULT_PROFILE, environ)))


def test_billing_restarted_on_a_fresh_data_folder_still_verifies_old_keys(postgres_url: str, tmp_path: Path) -> None:
    """Issue 15, hole 2: a restarted billing pod has a new, empty data folder; the key secret and the admin token
    come from the mounted Secret, so every key made before still works, and so does the operator's token."""
    url = clean_postgres(postgres_url).replace("postgresql+psycopg://", "postgresql://")
    mounted = tmp_path / "mounted-secret"
    mounted.mkdir()
    (mounted / "hmac.key").write_bytes(secrets.token_bytes(32))
    (mounted / "admin.token").write_bytes(secrets.token_bytes(32))
    before = {p.name: p.read_bytes() for p in mounted.iterdir()}
    first = _billing_in_a_pod(tmp_path / "pod-1", url, mounted)
    _, key = first.keys.create("kommune-z")
    token = load_or_create_admin_token(mounted, create=False)
    assert first.is_admin_token(token)

    restarted = _billing_in_a_pod(tmp_path / "pod-2", url, mounted)
    assert restarted.keys.verify(key) is not None
    assert restarted.is_admin_token(token)
    assert not (tmp_path / "pod-2" / "secrets").exists()  # nothing made beside the mounted secrets
    assert {p.name: p.read_bytes() for p in mounted.iterdir()} == before  # and nothing written into them


def test_a_secrets_folder_without_the_key_secret_is_a_clear_error(tmp_path: Path) -> None:
    """A provided secrets folder is never written to: a missing secret stops billing with the file's name, rather
    than a new secret that would invalidate every key."""
    mounted = tmp_path / "mounted-secret"
    mounted.mkdir()
    with pytest.raises(MissingSecret, match=r"hmac\.key"):
        _billing_in_a_pod(tmp_path / "pod", f"sqlite:///{tmp_path / 'anker.db'}", mounted)
    with pytest.raises(MissingSecret, match=r"hmac\.key"):
        open_key_store(tmp_path, secrets_dir=mounted)
    assert list(mounted.iterdir()) == []


def test_a_new_key_carries_a_checksum_that_any_change_of_one_character_breaks(tmp_path: Path) -> None:
    record, key = open_key_store(tmp_path).create("t")
    assert key_id_of(key) == record.key_id
    changed = [key[:i] + ("B" if key[i] == "A" else "A") + key[i + 1 :] for i in range(len("ank_"), len(key))]
    assert [c for c in changed if key_id_of(c) is not None] == []  # refused in process, before any look-up
    for bogus in ("not-a-key", "ank_not-a-key", key + "\n", key[:-1], key + "A", "ank_admin_" + "0" * 64):
        assert key_id_of(bogus) is None, bogus


def test_a_key_made_before_keys_carried_a_checksum_still_works(tmp_path: Path) -> None:
    store = open_key_store(tmp_path)
    record, key = store.create("t")
    old = key[:-6]  # as keys were made before: id and secret, no checksum
    with store.engine.begin() as db:
        db.execute(API_KEYS.update().where(API_KEYS.c.key_id == record.key_id).values(key_hmac=store._digest(old)))
    assert key_id_of(old) == record.key_id and store.verify(old) == record
    assert store.verify(key) is None  # the digest is of the key as it was handed out


def test_the_admin_token_is_shaped_like_no_key(tmp_path: Path) -> None:
    token = load_or_create_admin_token(tmp_path)
    assert ADMIN_TOKEN_PATTERN.fullmatch(token) and key_id_of(token) is None
