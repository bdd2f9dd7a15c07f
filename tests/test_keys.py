"""API keys: shown once, stored only as a keyed hash, verified in constant time, revocable; a keyed tag that tells a
made-up key in process to whoever holds billing's ``KeyCheck``, and keys made before tags still valid."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from config.settings import DEFAULT_PROFILE, load_config
from deployments.billing.service import BillingService, billing_spec, load_or_create_admin_token
from deployments.billing.tables import API_KEYS
from deployments.contracts import KeyCheck
from deployments.keys import (
    ADMIN_TOKEN_PATTERN,
    KEY_PATTERN,
    TAG_DIGITS,
    MissingSecret,
    checksummed,
    ensure_tenant,
    key_id_of,
    open_key_store,
    tag_key_of,
    tagged,
)
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


def _changed(key: str) -> list[str]:
    """``key`` with each of its characters after the prefix changed, one at a time."""
    return [key[:i] + ("B" if key[i] == "A" else "A") + key[i + 1 :] for i in range(len("ank_"), len(key))]


def test_a_new_key_carries_a_tag_that_only_the_tag_key_can_make(tmp_path: Path) -> None:
    store = open_key_store(tmp_path)
    record, key = store.create("t")
    check = KeyCheck(store.tag_key, store.untagged_key_ids(), b"")
    assert key_id_of(key) == record.key_id and check.may_be_valid(key)
    assert check.untagged_ids == frozenset()
    assert store.tag_key.hex() not in repr(check)  # a secret: never in a log or a span
    # Any change of one character: refused in process, before any look-up.
    assert [c for c in _changed(key) if check.may_be_valid(c)] == []
    for bogus in ("not-a-key", "ank_not-a-key", key + "\n", key[:-1], key + "A", "ank_admin_" + "0" * 64):
        assert key_id_of(bogus) is None and not check.may_be_valid(bogus), bogus
    # A tag made with another tag key (a forger's), or the CRC32 checksum anyone can compute: refused too.
    body = key[:-TAG_DIGITS]
    for forged in (tagged(body, tag_key_of(secrets.token_bytes(32))), checksummed(body), body):
        assert key_id_of(forged) == record.key_id and not check.may_be_valid(forged)
        assert store.verify(forged) is None
    # The tag key makes tags, not keys: a key with another secret part and a right tag is still no key.
    other = tagged(body[:-1] + ("B" if body[-1] == "A" else "A"), store.tag_key)
    assert check.may_be_valid(other) and store.verify(other) is None


def test_keys_made_before_tags_still_work_and_only_theirs_pass_the_check(tmp_path: Path) -> None:
    """Keys of the older shapes (a CRC32 checksum, or nothing) stay valid; the check passes those whose ids are of
    such keys, not revoked, and no other key of those shapes."""
    store = open_key_store(tmp_path)
    olds = []
    for make in (checksummed, lambda body: body):  # as keys were made before they carried a tag
        record, key = store.create("t")
        old = make(key[:-TAG_DIGITS])
        with store.engine.begin() as db:
            where = API_KEYS.c.key_id == record.key_id
            db.execute(API_KEYS.update().where(where).values(key_hmac=store._digest(old), tagged=False))
        assert store.verify(old) == record and store.verify(key) is None  # the digest is of the key handed out
        olds.append((record, old))
    check = KeyCheck(store.tag_key, store.untagged_key_ids(), b"")
    assert check.untagged_ids == {record.key_id for record, _ in olds}
    assert all(check.may_be_valid(old) for _, old in olds)
    _, new_key = store.create("t")
    assert not check.may_be_valid(checksummed(new_key[:-TAG_DIGITS]))  # an id of a tagged key, in an older shape
    assert not check.may_be_valid(checksummed("ank_0123456789ab_" + "C" * 43))  # an id of no key
    store.revoke(olds[0][0].key_id)
    assert store.untagged_key_ids() == {olds[1][0].key_id}


def test_the_migration_marks_the_keys_made_before_it_as_untagged(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from deployments import database

    engine = database.create_engine(database.database_url(tmp_path, None))
    config = Config()
    config.set_main_option("script_location", str(database.MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
    store = open_key_store(tmp_path, migrate=False)
    old = checksummed("ank_0123456789ab_" + "D" * 43)
    with engine.begin() as db:
        ensure_tenant(db, "t")
        db.execute(
            sa.text(
                "INSERT INTO api_keys (key_id, tenant, key_hmac, created_at, role) "
                "VALUES ('0123456789ab', 't', :digest, 0, 'member')"
            ),
            {"digest": store._digest(old)},
        )
    database.migrate(engine)
    assert store.untagged_key_ids() == {"0123456789ab"}
    record = store.verify(old)
    assert record is not None and record.key_id == "0123456789ab"
    _, new = store.create("t")
    assert store.untagged_key_ids() == {"0123456789ab"} and store.verify(new) is not None


def test_the_admin_token_is_shaped_like_no_key(tmp_path: Path) -> None:
    token = load_or_create_admin_token(tmp_path)
    assert ADMIN_TOKEN_PATTERN.fullmatch(token) and key_id_of(token) is None
