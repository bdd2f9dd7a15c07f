"""Compliance documents generated from the running configuration (`anker compliance report`): the GDPR Art. 30
record of processing activities, the data flows between every component and port, and the NIS2 incident runbook.

Facts come from the config, the ledger's table definitions and the alert rules, so the documents cannot drift from
the code. Nothing here opens the database, and no credential is ever written: URLs lose their user and password.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cluster.compliance.flows import data_flows
from cluster.compliance.gdpr import record_of_processing
from cluster.compliance.nis2 import incident_runbook
from config.schema import AnkerConfig

RECORD, FLOWS, RUNBOOK = "gdpr-art30-record.md", "data-flows.md", "nis2-incident-runbook.md"


def documents(config: AnkerConfig, environ: Mapping[str, str], source: str, today: str | None = None) -> dict[str, str]:
    """File name -> Markdown of each compliance document generated from ``config`` and the ``OTEL_*`` environment."""
    day = today or datetime.now(UTC).date().isoformat()
    return {
        RECORD: record_of_processing(config, environ, source, day),
        FLOWS: data_flows(config, environ, source, day),
        RUNBOOK: incident_runbook(config, source, day),
    }


def write(config: AnkerConfig, environ: Mapping[str, str], source: str, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in documents(config, environ, source).items():
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    return written
