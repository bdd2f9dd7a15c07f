"""The GDPR Art. 30 record of processing activities of an Anker installation, generated from its config: roles,
purposes, data subjects, retained data (from the table definitions), retention, recipients, location, transfers and
the technical and organisational measures.
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.compliance.facts import (
    TABLES,
    database,
    measures,
    otlp_endpoint,
    region,
    retained_columns,
    retention,
)
from cluster.compliance.markdown import checked, header
from config.naming import REGION_LABEL
from config.schema import AnkerConfig
from deployments.billing.tables import METADATA


def record_of_processing(config: AnkerConfig, environ: Mapping[str, str], source: str, today: str) -> str:
    db, otlp = database(config), otlp_endpoint(environ)
    regions = {m.name: region(m.region) for m in config.models}
    abroad = [f"`{name}` in `{r.code}` ({r.place})" for name, r in regions.items() if not r.in_eea]
    all_measures = measures(config)
    to_act = [m for m in all_measures if not m.ok]
    months = config.billing.retention_months
    out = header("Record of processing activities (GDPR Art. 30)", source, today)
    out += ["## Points to act on", ""]
    out += [f"- ⚠ third-country transfer: {a}" for a in abroad] + [checked(m) for m in to_act]
    out += [] if abroad or to_act else ["None: nothing in the configuration weakens the measures below."]
    out += [
        "",
        "## 1. Controller, processor and their roles",
        "",
        "The operator of this Anker installation (name, address and data protection contact: to be completed by the "
        "operator; they are not part of Anker's configuration) acts in two roles:",
        "",
        "| Processing | Operator's role | Legal basis |",
        "| --- | --- | --- |",
        "| Inference on request content (prompts, completions) for API customers | **processor** (Art. 28, a data "
        "processing agreement with each customer; Art. 30(2) record) | the customer's, as controller |",
        "| Organisations, members, API keys, usage, invoices | **controller** | contract (Art. 6(1)(b)); bookkeeping "
        "law (Art. 6(1)(c)) |",
        "| Audit log, rate limits, metrics and traces (security and operations) | **controller** | legitimate "
        "interest in a secure service (Art. 6(1)(f), Art. 32) |",
        "",
        "## 2. Purposes",
        "",
        "1. Serve OpenAI-compatible inference on the configured models: "
        + ", ".join(f"`{m.name}`" for m in config.models)
        + ".",
        "2. Authenticate API keys, enforce roles, model allow-lists, rate limits and budgets.",
        "3. Bill each request exactly once (DKK, per token kind) and invoice organisations; keep the books.",
        "4. Keep the service secure and available: audit log, metrics, traces, alerts (`nis2-incident-runbook.md`).",
        "",
        "## 3. Data subjects and categories of personal data",
        "",
        "**Request content** (prompts, chat messages, completions): whatever the customer's users send, which may "
        "include any personal data, special categories (Art. 9) included. It is processed **transiently, in memory "
        "only, and never retained**: in the ingress (the HTTP request), the tokenizer (text to token ids), the "
        "engine replica (token ids, KV cache until evicted) and on its way back to the client. Nothing writes it to "
        "the database, a log line, an error message, a span, a metric or a file; the API refuses `store: true`.",
        "",
        "**Retained: counts and metadata only.** The complete list of what Anker's database holds, generated from "
        "its table definitions (`deployments/billing/tables.py`):",
        "",
        "| Table | Purpose | Whose data | Retention |",
        "| --- | --- | --- | --- |",
    ]
    for table in METADATA.sorted_tables:
        purpose, whose, rule = TABLES[table.name]
        out.append(f"| `{table.name}` | {purpose} | {whose} | {retention(config, rule)} |")
    out += ["", "| Table | Column | Type |", "| --- | --- | --- |"]
    out += [f"| `{t}` | `{c}` | {kind} |" for t, c, kind in retained_columns()]
    out += [
        "",
        "Outside the database: log lines (request id, model, status, token counts), the usage spool "
        f"`{config.data_dir / 'outbox'}` (the same counts, removed once billed), traces if exported (ids, "
        "organisation, key id, model, counts) and metrics (model, status, counts; never an organisation, key or "
        "text).",
        "",
        "## 4. Retention",
        "",
        f"- Ledger, prices, budgets and audit log: **{months} months** (`billing.retention_months`), counted back "
        "from the current month and then to the start of that calendar year, so a financial year's rows go together "
        "(default 60: the Danish bookkeeping act (bogføringsloven) keeps accounting records for 5 years from the end "
        "of the financial year).",
        "- Organisations: while the organisation is a customer. Members and keys: until removed or revoked, then as "
        "long as the ledger rows that name them.",
        "- Request content: not retained (the length of the request; KV-cache blocks until evicted).",
        "- Deletion is automatic: the billing actor deletes expired rows once a day "
        "(`deployments/billing/retention.py`).",
        "",
        "## 5. Recipients and processors",
        "",
        f"- Database ({db.kind}): **{db.where}**"
        + (f": the operator of `{db.host}` is a processor if it is not the operator itself" if db.host else "")
        + ".",
        f"- Traces: {otlp or 'not exported (`OTEL_TRACES_EXPORTER` unset or `none`)'}.",
        f"- Metrics: scraped by Prometheus from each node's port {config.ray.metrics_export_port}"
        + (f" (`{config.observability.prometheus_host}`)" if config.observability.prometheus_host else "")
        + (
            f"; dashboards in Grafana `{config.observability.grafana_host}`"
            if config.observability.grafana_host
            else ""
        )
        + ". Metrics hold no personal data.",
        "- Customers see their own organisation's usage (API and dashboard); public authorities where the law says so.",
        "",
        "## 6. Processing location and transfers",
        "",
        "The proxy, ingress, tokenizer and billing actor run on the Ray cluster's nodes; each model's engines run in "
        "its region:",
        "",
        "| Model | Region | Location | Residency enforced |",
        "| --- | --- | --- | --- |",
    ]
    for m in config.models:
        r = regions[m.name]
        pinned = f"yes, nodes labelled `{REGION_LABEL}={m.residency}`" if m.residency else "no"
        out.append(f"| `{m.name}` | `{r.code}` | {r.place} | {pinned} |")
    out += [""]
    if abroad:
        out += [
            "**Transfers to third countries (Chapter V): " + "; ".join(abroad) + ".** Requests to these models send "
            "their content there: they need an adequacy decision or appropriate safeguards (standard contractual "
            "clauses and a transfer impact assessment) and the customers' consent as controllers, or the model must "
            "move to an EU/EEA region. A key's allow-list (`region:dk`) keeps a customer's requests in the EU/EEA.",
        ]
    else:
        out += ["**Transfers to third countries: none.** Every configured region is in the EU/EEA."]
    out += ["", "## 7. Technical and organisational measures (Art. 32)", ""]
    out += [checked(m) for m in all_measures] + [""]
    return "\n".join(out)
