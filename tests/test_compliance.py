"""`anker compliance report`: the GDPR Art. 30 record, the data flows and the NIS2 runbook follow the config (regions,
transfers, database host, trace endpoint), list every column the database retains and every alert rule, and never
print a credential. No stack needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.compliance import FLOWS, RECORD, RUNBOOK, documents
from cluster.compliance.facts import TABLES, public_address, region
from cluster.compliance.nis2 import GUIDANCE, MISSING, family
from config.schema import AnkerConfig
from config.settings import DEFAULT_PROFILE, PROFILES_DIR, load_config
from deployments.billing.tables import METADATA
from observability.alerts import rule_groups

ANKER = str(Path(sys.executable).parent / "anker")
PASSWORD = "s3cr3t-Pa55w0rd"
POSTGRES = f"postgresql://anker_owner:{PASSWORD}@db.example:5432/anker"
PROFILES = sorted(PROFILES_DIR.glob("*.yaml"))


def generate(environ: dict[str, str], profile: Path = DEFAULT_PROFILE) -> tuple[AnkerConfig, dict[str, str]]:
    config = load_config(profile, environ)
    return config, documents(config, environ, profile.name, today="2026-11-01")


def test_the_local_profile_keeps_everything_in_denmark() -> None:
    config, docs = generate({})
    record = docs[RECORD]
    assert set(docs) == {RECORD, FLOWS, RUNBOOK}
    assert "**Transfers to third countries: none.**" in record and "third-country transfer" not in record
    assert "| `qwen3-next-tiny` | `dk` | Denmark | no |" in record
    assert f"Database (SQLite): **{config.data_dir / 'anker.db'}**" in record
    assert "60 months (`billing.retention_months`)" in record
    assert "Deletion is automatic" in record and "deployments/billing/retention.py" in record
    assert (Path(__file__).parent.parent / "deployments" / "billing" / "retention.py").exists()
    assert "Traces: not exported" in record
    assert "127.0.0.1:8000" in docs[FLOWS] and f"port {config.ray.gcs_port}" in docs[FLOWS]


def test_another_region_and_database_change_the_documents() -> None:
    environ = {
        "ANKER_DATABASE_URL": POSTGRES,
        "ANKER__MODELS__1__REGION": "us",
        "ANKER__BILLING__RETENTION_MONTHS": "72",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:t0ken-in-url@otel.example:4318/?api_key=qu3ry-t0ken",
    }
    _, default = generate({})
    _, docs = generate(environ)
    record, flows = docs[RECORD], docs[FLOWS]
    assert record != default[RECORD] and flows != default[FLOWS]
    # The region is listed, and the transfer to a third country is flagged as a point to act on.
    assert "| `qwen3-moe-tiny` | `us` | US, outside the EU/EEA (third country) | no |" in record
    points = record.split("## Points to act on")[1].split("## 1.")[0]
    assert "third-country transfer: `qwen3-moe-tiny` in `us`" in points
    assert "Transfers to third countries (Chapter V)" in record and "Transfers to third countries: none" not in record
    assert "Engine-qwen3-moe-tiny in us" in flows
    # The database host and the trace endpoint are named; TLS that the URL does not require is flagged.
    assert "Database (PostgreSQL): **db.example:5432/anker**" in record and "db.example:5432/anker" in flows
    assert "does not require TLS" in points
    assert "https://otel.example:4318/ (OTLP over HTTP)" in record
    assert "72 months (`billing.retention_months`)" in record
    # No credential anywhere: not the password, not the user, not the token in the URL or its query.
    for text in docs.values():
        for secret in (PASSWORD, "anker_owner", "t0ken-in-url", "qu3ry-t0ken", "collector"):
            assert secret not in text


def test_a_database_url_that_asks_for_tls_is_not_flagged() -> None:
    _, docs = generate({"ANKER_DATABASE_URL": POSTGRES + "?sslmode=verify-full"})
    assert "- ✓ TLS to the database is required (`sslmode=verify-full`)" in docs[RECORD]
    assert PASSWORD not in docs[RECORD]


def test_every_ledger_column_is_in_the_retained_data_list() -> None:
    assert set(TABLES) == set(METADATA.tables), "describe every table of deployments/billing/tables.py in TABLES"
    _, docs = generate({})
    retained = docs[RECORD].split("**Retained: counts and metadata only.**")[1].split("## 4. Retention")[0]
    for table in METADATA.sorted_tables:
        assert f"| `{table.name}` | {TABLES[table.name][0]} |" in retained
        for column in table.columns:
            assert f"| `{table.name}` | `{column.name}` |" in retained, f"{table.name}.{column.name}"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_alert_rule_is_in_the_runbook_with_what_to_do(profile: Path) -> None:
    config, docs = generate({}, profile)
    runbook = docs[RUNBOOK]
    assert MISSING not in runbook
    for group in rule_groups(config)["groups"]:
        for rule in group["rules"]:
            assert family(rule["alert"]) in GUIDANCE, f"no runbook entry for {rule['alert']}"
            assert f"#### {rule['alert']} ({rule['labels']['severity']}" in runbook
            assert rule["expr"] in runbook
    for needle in ("within **24 hours**", "within **72 hours**", "within **one month**", "CFCS", "virk.dk"):
        assert needle in runbook
    assert "## What counts as a significant incident" in runbook and "more than 30 minutes" in runbook


def test_a_production_profile_states_residency_and_flags_what_needs_care() -> None:
    profile = PROFILES_DIR / "qwen35-397b-bf16-h100x2-tp8-pp2.yaml"
    _, docs = generate({}, profile)
    record, flows = docs[RECORD], docs[FLOWS]
    assert "| `qwen3.5-397b-a17b` | `dk` | Denmark | yes, nodes labelled `anker/region=dk` |" in record
    assert "**Transfers to third countries: none.**" in record
    points = record.split("## Points to act on")[1].split("## 1.")[0]
    assert "0.0.0.0:8000 in plain HTTP" in points  # the proxy listens on the pod: TLS must end in front of it
    assert "one replica spans 2 nodes" in points  # vLLM's inter-node traffic needs a network of its own
    assert "does not require TLS" in points and "anker-postgres.anker.svc/anker" in record
    assert "only `anker/region=dk` nodes" in flows and "2 node(s)" in flows


def test_risky_engine_settings_are_flagged(tmp_path: Path) -> None:
    raw = yaml.safe_load(DEFAULT_PROFILE.read_text(encoding="utf-8"))
    raw["models"][0]["engine_env"] = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    profile = tmp_path / "risky.yaml"
    profile.write_text(yaml.safe_dump(raw), encoding="utf-8")
    environ = {
        "ANKER__MODELS__0__ENGINE_ARGS__TRUST_REMOTE_CODE": "true",
        "ANKER__MODELS__1__ENGINE_ARGS__ENABLE_LOG_REQUESTS": "true",
        "ANKER__SERVER__HOST": "0.0.0.0",
        "ANKER__RAY__DASHBOARD_HOST": "0.0.0.0",
    }
    _, docs = generate(environ, profile)
    points = docs[RECORD].split("## Points to act on")[1].split("## 1.")[0]
    assert "qwen3-next-tiny: `trust_remote_code`" in points
    assert "qwen3-next-tiny: `VLLM_ALLOW_INSECURE_SERIALIZATION`" in points
    assert "qwen3-moe-tiny: engine_args turn vLLM's request log on" in points
    assert "0.0.0.0:8000 in plain HTTP" in points and "job API listen on 0.0.0.0:8265" in points


def test_regions_and_addresses() -> None:
    assert region("dk").in_eea and region("se-south").place == "Sweden" and region("no").in_eea
    assert region("eu").in_eea and region("eu-north").in_eea
    assert not region("us").in_eea and not region("gb").in_eea and not region("local").in_eea
    assert public_address("https://u:p@h.example:4317/v1/traces?k=v#f") == "https://h.example:4317/v1/traces"
    assert public_address("http://[::1]:4318") == "http://[::1]:4318"


def test_the_cli_writes_the_three_documents_without_the_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANKER", "OTEL_"))}
    env.update({"ANKER_DATA_DIR": str(tmp_path / "data"), "ANKER_DATABASE_URL": POSTGRES})
    out = subprocess.run(
        [ANKER, "compliance", "report", "--out", str(tmp_path / "docs")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in (tmp_path / "docs").iterdir())
    assert written == sorted([RECORD, FLOWS, RUNBOOK]) and out.stdout.count("wrote ") == 3
    for name in written:
        text = (tmp_path / "docs" / name).read_text(encoding="utf-8")
        assert PASSWORD not in text and "anker_owner" not in text
    assert "db.example:5432/anker" in (tmp_path / "docs" / RECORD).read_text(encoding="utf-8")
    assert not (tmp_path / "data").exists()  # it read the config only: no database, no secrets created
