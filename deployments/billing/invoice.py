"""Monthly invoices: usage per model and token kind at the prices it was billed at, plan fee, discount, net, VAT
and total, in DKK, written as JSON and CSV.

Amounts are exact until the one rounding to øre per invoice line and total (``pricing.invoice_totals``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deployments.billing.budgets import month_bounds
from deployments.billing.ledger import Ledger, usage_total
from deployments.billing.pricing import format_dkk, invoice_totals, to_ore
from deployments.billing.tables import TENANTS

KINDS = (
    ("input_uncached", "input tokens (uncached)"),
    ("input_cached", "input tokens (cached)"),
    ("output", "output tokens"),
)


def build_invoice(ledger: Ledger, tenant: str, month: str, vat_percent: Decimal) -> dict[str, Any]:
    """The invoice of ``tenant`` for ``month`` (``2026-11``); raises LookupError for an unknown tenant."""
    start, end = month_bounds(month)
    with ledger.engine.connect() as db:
        row = db.execute(sa.select(TENANTS).where(TENANTS.c.tenant == tenant)).first()
    if row is None:
        raise LookupError(f"no tenant {tenant}")
    monthly = row.plan == "monthly"
    discount_percent = Decimal(row.discount_bp) / 100 if monthly else Decimal(0)
    lines = []
    by_model = ledger.usage(tenant, start, end, "model")
    usage_nano = usage_total(by_model, start, end).cost_nano_dkk
    for bucket in by_model:
        tokens = {
            "input_uncached": bucket.prompt_tokens - bucket.cached_tokens,
            "input_cached": bucket.cached_tokens,
            "output": bucket.completion_tokens,
        }
        amounts = {
            "input_uncached": bucket.cost_input_uncached_nano_dkk,
            "input_cached": bucket.cost_input_cached_nano_dkk,
            "output": bucket.cost_output_nano_dkk,
        }
        for kind, label in KINDS:
            lines.append(
                {
                    "model": bucket.model,
                    "kind": kind,
                    "description": f"{bucket.model}: {label}",
                    "tokens": tokens[kind],
                    "requests": bucket.requests,
                    "amount_dkk": format_dkk(to_ore(amounts[kind])),
                    "amount_nano_dkk": amounts[kind],
                }
            )
    totals = invoice_totals(usage_nano, row.plan_fee_ore if monthly else 0, discount_percent, vat_percent)
    money = {name: format_dkk(value) for name, value in asdict(totals).items()}
    return {
        "object": "invoice",
        "tenant": tenant,
        "display_name": row.display_name,
        "month": month,
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "currency": "DKK",
        "plan": row.plan,
        "discount_percent": str(discount_percent),
        "vat_percent": str(vat_percent),
        "lines": lines,
        "usage_nano_dkk": usage_nano,
        "usage_dkk": money["usage_ore"],
        "plan_fee_dkk": money["plan_fee_ore"],
        "discount_dkk": money["discount_ore"],
        "net_dkk": money["net_ore"],
        "vat_dkk": money["vat_ore"],
        "total_dkk": money["total_ore"],
    }


def write_invoice(invoice: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"invoice-{invoice['tenant']}-{invoice['month']}"
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(invoice, indent=2) + "\n", encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["description", "model", "kind", "tokens", "amount_dkk"])
        for line in invoice["lines"]:
            writer.writerow([line["description"], line["model"], line["kind"], line["tokens"], line["amount_dkk"]])
        writer.writerow(["usage", "", "", "", invoice["usage_dkk"]])
        writer.writerow([f"discount {invoice['discount_percent']} %", "", "", "", f"-{invoice['discount_dkk']}"])
        writer.writerow(["monthly plan fee", "", "", "", invoice["plan_fee_dkk"]])
        writer.writerow(["net", "", "", "", invoice["net_dkk"]])
        writer.writerow([f"VAT {invoice['vat_percent']} %", "", "", "", invoice["vat_dkk"]])
        writer.writerow(["total", "", "", "", invoice["total_dkk"]])
    return json_path, csv_path
