"""The `anker` command: help texts, exit codes, key creation, tiny model builds (no running stack needed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from cluster.tiny_models import build_model, is_built
from deployments.keys import KEY_PATTERN, open_key_store

ANKER = str(Path(sys.executable).parent / "anker")


def anker(*args: str, data_dir: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env}
    if data_dir is not None:
        environ["ANKER_DATA_DIR"] = str(data_dir)
    return subprocess.run([ANKER, *args], capture_output=True, text=True, env=environ, timeout=120)


def test_help_lists_commands_and_examples() -> None:
    out = anker("--help")
    assert out.returncode == 0
    for word in ("up", "down", "status", "keys", "model", "config", "examples:", "exit codes"):
        assert word in out.stdout
    up = anker("up", "--help")
    assert "--detach" in up.stdout and "--port" in up.stdout and "server:" in up.stdout


def test_version() -> None:
    out = anker("--version")
    assert out.returncode == 0 and out.stdout.startswith("anker 0.")


def test_unknown_command_is_a_usage_error() -> None:
    assert anker("frobnicate").returncode == 2


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    path: /m\n    max_replicas: 0\n")
    out = anker("config", "check", "--config", str(bad))
    assert out.returncode == 2 and "models.0.max_replicas" in out.stderr
    out = anker("up", "--config", str(bad), data_dir=tmp_path)
    assert out.returncode == 2 and "models.0.max_replicas" in out.stderr


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    created = anker("keys", "create", "--tenant", "kommune-x", data_dir=tmp_path)
    assert created.returncode == 0
    key = created.stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.match(key)
    assert open_key_store(tmp_path).verify(key) is not None
    key_id = key.split("_")[1]
    listed = anker("keys", "list", data_dir=tmp_path)
    assert key_id in listed.stdout and "kommune-x" in listed.stdout and key not in listed.stdout
    assert anker("keys", "revoke", key_id, data_dir=tmp_path).returncode == 0
    assert open_key_store(tmp_path).verify(key) is None
    assert anker("keys", "revoke", key_id, data_dir=tmp_path).returncode == 1
    assert anker("keys", "create", "--tenant", "bad name", data_dir=tmp_path).returncode == 2


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    out = anker("status", data_dir=tmp_path)
    assert out.returncode == 3 and "not running" in out.stdout
    assert anker("down", data_dir=tmp_path).returncode == 0


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_model_build_is_deterministic_and_small(tmp_path: Path) -> None:
    out = anker("model", "build", "--out", str(tmp_path / "a"))
    assert out.returncode == 0 and "qwen3-next" in out.stdout
    build_model(tmp_path / "b", "qwen3-next")
    assert is_built(tmp_path / "a") and _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert sum(p.stat().st_size for p in (tmp_path / "a").iterdir()) < 10_000_000
    config = (tmp_path / "a" / "config.json").read_text()
    assert "Qwen3NextForCausalLM" in config and "linear_attention" in config


def test_model_build_moe_differs_from_next(tmp_path: Path) -> None:
    assert anker("model", "build", "--out", str(tmp_path / "moe"), "--arch", "qwen3-moe").returncode == 0
    assert "Qwen3MoeForCausalLM" in (tmp_path / "moe" / "config.json").read_text()
    assert anker("model", "build", "--out", str(tmp_path / "x"), "--arch", "qwen3.5").returncode == 2


def test_organisations_keys_usage_and_invoice(tmp_path: Path) -> None:
    """Plan and budget by CLI, usage in the ledger, then `anker usage` and `anker invoice` against hand-computed DKK."""
    import csv
    from datetime import UTC, datetime

    from deployments.billing.governance import Actor
    from deployments.billing.ledger import UsageEvent
    from deployments.billing.service import BillingService, BillingSpec
    from tests.inprocess import PRICES

    made = anker(
        "tenants",
        "create",
        "aarhus",
        "--plan",
        "monthly",
        "--monthly-fee-dkk",
        "500",
        "--discount-percent",
        "10",
        data_dir=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    created = anker(
        "keys",
        "create",
        "--tenant",
        "aarhus",
        "--role",
        "admin",
        "--budget-dkk",
        "250",
        "--rpm",
        "60",
        "--tpm",
        "100000",
        "--models",
        "region:dk",
        data_dir=tmp_path,
    )
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.strip().split("_")[1]
    listed = json.loads(anker("keys", "list", "--tenant", "aarhus", "--json", data_dir=tmp_path).stdout)
    assert (
        listed[0]["role"] == "admin"
        and listed[0]["budget_dkk"] == "250"
        and listed[0]["allowed_models"] == ["region:dk"]
    )
    assert anker("keys", "create", "--tenant", "aarhus", "--rpm", "-5", data_dir=tmp_path).returncode == 2

    # 1M prompt tokens (400k cached) and 100k output: 600k x 6 + 400k x 3 + 100k x 45 per 1M = 3.60 + 1.20 + 4.50
    service = BillingService(BillingSpec(tmp_path, None, {"qwen3-next-tiny": PRICES}, 600, 2_000_000))
    at = datetime(2026, 11, 3, 12, tzinfo=UTC)
    service.ledger.set_price("qwen3-next-tiny", PRICES, datetime(2026, 1, 1, tzinfo=UTC))
    service.ledger.record(
        [UsageEvent("r1", "aarhus", key_id, "qwen3-next-tiny", 1_000_000, 400_000, 100_000, at, at, "ok")]
    )

    usage = json.loads(anker("usage", "--tenant", "aarhus", "--month", "2026-11", "--json", data_dir=tmp_path).stdout)
    assert usage["totals"]["cost_dkk"] == "9.3" and usage["totals"]["input_cached_tokens"] == 400_000
    assert usage["data"][0]["cost_input_uncached_dkk"] == "3.6" and usage["data"][0]["cost_output_dkk"] == "4.5"

    out = anker(
        "invoice", "--tenant", "aarhus", "--month", "2026-11", "--out", str(tmp_path / "inv"), data_dir=tmp_path
    )
    assert out.returncode == 0, out.stderr
    json_path, csv_path = (Path(p) for p in out.stdout.split())
    invoice = json.loads(json_path.read_text())
    # usage 9.30, discount 10 % = 0.93, fee 500.00: net 508.37; VAT 25 % = 127.0925 -> 127.09; total 635.46
    assert (invoice["usage_dkk"], invoice["discount_dkk"], invoice["plan_fee_dkk"]) == ("9.30", "0.93", "500.00")
    assert (invoice["net_dkk"], invoice["vat_dkk"], invoice["total_dkk"]) == ("508.37", "127.09", "635.46")
    rows = list(csv.reader(csv_path.open()))
    assert rows[-1] == ["total", "", "", "", "635.46"] and ["VAT 25 %", "", "", "", "127.09"] in rows
    assert anker("invoice", "--tenant", "nobody", data_dir=tmp_path).returncode == 1
    audit = service.governance.audit_log(Actor.operator(), "aarhus")
    assert {e["action"] for e in audit} >= {"tenant.create", "tenant.update", "key.create"}
    assert all(e["actor"].startswith("cli:") for e in audit)


def test_organisation_ceilings_by_cli(tmp_path: Path) -> None:
    """The operator sets an organisation's ceilings with `anker tenants`; keys beyond them are refused."""
    ceilings = ("--max-rpm", "10", "--max-tpm", "5000", "--max-keys", "1")
    made = anker("tenants", "create", "odense", *ceilings, data_dir=tmp_path)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["ceilings"] == {"max_rpm": 10, "max_tpm": 5000, "max_keys": 1}
    over = anker("keys", "create", "--tenant", "odense", "--rpm", "11", data_dir=tmp_path)
    assert over.returncode == 2 and "`rpm`" in over.stderr and "10" in over.stderr
    assert anker("keys", "create", "--tenant", "odense", "--rpm", "10", data_dir=tmp_path).returncode == 0
    second = anker("keys", "create", "--tenant", "odense", data_dir=tmp_path)
    assert second.returncode == 1 and "at most 1 active keys" in second.stderr
    lifted = anker("tenants", "set", "odense", "--max-keys", "none", "--max-rpm", "20", data_dir=tmp_path)
    assert lifted.returncode == 0, lifted.stderr
    assert json.loads(lifted.stdout)["ceilings"] == {"max_rpm": 20, "max_tpm": 5000, "max_keys": None}
    assert anker("keys", "create", "--tenant", "odense", data_dir=tmp_path).returncode == 0
    assert anker("tenants", "set", "odense", "--max-keys", "many", data_dir=tmp_path).returncode == 2
