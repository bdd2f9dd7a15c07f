"""The NIS2 incident runbook: every alert rule ``observability.alerts`` generates from the config, with what it means
and what to do, the first hour of an incident, the reporting clock, and what makes an incident significant.
"""

from __future__ import annotations

from typing import Any

from cluster.compliance.markdown import header
from config.schema import AnkerConfig

MISSING = "NO RUNBOOK ENTRY: add one to GUIDANCE in cluster/compliance/nis2.py."

# What each alert family means and what to do; the rules themselves come from observability/alerts.py. An alert
# without an entry here fails tests/test_compliance.py.
GUIDANCE: dict[str, tuple[str, str, str]] = {
    "AnkerSlowFirstToken": (
        "Too many requests wait longer than the first-token objective: engines are queueing, a replica is "
        "restarting, or one client floods the service.",
        "Open the SRE dashboard (first token, engine queue, KV cache, replicas wanted vs running); `anker status`; "
        "raise `max_replicas` or add GPUs if the queue is organic; lower the flooding key's `rpm`/`tpm` if not.",
        "A degradation. Significant if the service is limited for many users for over an hour, or if an attack "
        "causes it.",
    ),
    "AnkerServerErrors": (
        "Too many requests end in a 5xx: an engine core died (503 `engine_unavailable`), billing is away (503 "
        "`billing_unavailable`), or an internal error (500).",
        "Find the request ids in the Serve logs (one `usage request_id=...` line each); check the Engine and Billing "
        "deployments in the Ray dashboard and the database; Serve replaces unhealthy replicas by itself.",
        "Significant if the service is completely unavailable for over 30 minutes, or limited for over an hour.",
    ),
    "AnkerEngineQueueAboveTarget": (
        "A model's engines queue more than their autoscaling target for a while: capacity is short, or the replica "
        "ceiling is reached.",
        "Compare replicas wanted and running; raise `max_replicas` or capacity; look for a single key sending most "
        "traffic (a denial of service) and limit it.",
        "Not by itself; it becomes one when it turns into unavailability or is caused by an attack.",
    ),
    "AnkerReplicasBelowFloor": (
        "A model serves with fewer engine replicas than its floor: a node or GPU is lost, a replica crashes at "
        "start, or no node carries the model's region label.",
        "`ray status` (nodes, GPUs, labels), the Serve deployment's events and replica logs; check the node labels "
        "for residency; replace the node. Never move a resident model to an unlabelled node.",
        "With no replica at all, the model is unavailable: at 30 minutes it is a significant incident.",
    ),
    "AnkerUsagePending": (
        "Usage reports wait for the ledger: the billing actor or the database is down. Requests keep being served; "
        "keys with a budget get 503 until billing is back.",
        "Check the Billing deployment and the database (reachability, disk, credentials); keep the spool files in "
        "`<data_dir>/outbox`: they are re-sent and billed exactly once when billing is back.",
        "A financial-loss risk; significant if ledger data is lost or altered, or the loss is large.",
    ),
    "AnkerUsageSetAside": (
        "Usage reports reached billing but could not be recorded (a model without a price at the request's start, "
        "impossible counts): they are kept unbilled in `usage_set_aside`; the rest of the usage is billed.",
        "Run `anker set-aside` for the reasons. For `unpriced_model`, give the model its price in the config and "
        "restart billing, then `anker set-aside --record` (a request served before the model's first price pays "
        "that price); other reasons point to a bug to report.",
        "A financial-loss risk while unresolved; no data is lost.",
    ),
}


def family(alert: str) -> str:
    """The alert's family: the burn-rate rules of one objective share it (``AnkerServerErrorsBurnRate1h``)."""
    return alert.split("BurnRate", 1)[0]


def incident_runbook(config: AnkerConfig, source: str, today: str) -> str:
    from observability.alerts import rule_groups

    out = header("Operations runbook: NIS2 incident handling", source, today)
    out += [
        "Every alert rule that `anker alerts` generates from this config, with what it means and what to do. `page` "
        "wakes someone; `ticket` is handled in working hours. An alert is not yet an incident: decide with "
        "[What counts as a significant incident](#what-counts-as-a-significant-incident), and start the "
        "[reporting clock](#the-reporting-clock) when the answer is yes.",
        "",
        "## Alerts",
    ]
    families: dict[str, list[dict[str, Any]]] = {}
    for group in rule_groups(config)["groups"]:
        for rule in group["rules"]:
            families.setdefault(family(rule["alert"]), []).append(rule)
    for name, rules in families.items():
        meaning, action, nis2 = GUIDANCE.get(name, (MISSING, MISSING, MISSING))
        out += ["", f"### {name}", "", f"- **Means:** {meaning}", f"- **Do:** {action}", f"- **NIS2:** {nis2}"]
        for rule in rules:
            labels = rule.get("labels", {})
            where = f", model `{labels['model']}`" if "model" in labels else ""
            waits = f", for {rule['for']}" if "for" in rule else ""
            out += [
                "",
                f"#### {rule['alert']} ({labels.get('severity', '?')}{where}{waits})",
                "",
                f"{rule['annotations']['summary']}.",
                "",
                f"```promql\n{rule['expr']}\n```",
            ]
    out += [
        "",
        "## First hour of any incident",
        "",
        "1. Write down the time you became aware of it (UTC): the reporting clock runs from then.",
        "2. Keep the evidence: the Ray session folder and `<data_dir>/run/ray-head.log`, `GET /admin/audit`, the "
        "Prometheus data. Do not run `ray stop` (it kills every Ray cluster on the machine); `anker down` stops only "
        "Anker's.",
        "3. Contain: revoke keys (`anker keys revoke`), remove members, or stop the stack. A suspected compromise of "
        "the cluster means rotating the Ray token (`<data_dir>/secrets/ray_auth_token`) and the admin token; rotating "
        "`hmac.key` invalidates every API key.",
        "4. Decide whether it is significant (below) and whether personal data is involved (GDPR, below).",
        "",
        "## The reporting clock",
        "",
        "| When (from awareness) | What | Content |",
        "| --- | --- | --- |",
        "| within **24 hours** | early warning | suspected unlawful or malicious cause? possible cross-border "
        "impact? |",
        "| within **72 hours** | incident notification | update of the warning, initial assessment: severity, impact, "
        "indicators of compromise |",
        "| on request | intermediate report | status updates |",
        "| within **one month** of the notification | final report | description, severity and impact, type of "
        "threat or root cause, mitigations applied and ongoing, cross-border impact; a progress report instead if "
        "the incident is still ongoing, and the final report within a month of handling it |",
        "",
        "Reports go through virk.dk, which forwards them to the competent authority of the sector and to the Danish "
        "CSIRT, the Centre for Cyber Security (CFCS). For the digital sector the authority is the Agency for Digital "
        "Government (Digitaliseringsstyrelsen). Also tell the customers whose service a significant incident is likely "
        "to affect, without undue delay.",
        "",
        "**Personal data too (GDPR)?** For request content Anker is a processor: tell each affected customer without "
        "undue delay (Art. 33(2)); they notify Datatilsynet. For account and billing data Anker is the controller: "
        "notify Datatilsynet within 72 hours unless the breach is unlikely to result in a risk (Art. 33), and the "
        "people concerned when the risk is high (Art. 34).",
        "",
        "## What counts as a significant incident",
        "",
        "Under NIS2 Art. 23(3) (§ 12 of the Danish NIS2 act), an incident that has caused or can cause severe "
        "operational disruption of the service or financial loss for the operator, or considerable material or "
        "non-material damage to others. Commission Implementing Regulation (EU) 2024/2690 makes it concrete for "
        "digital-infrastructure providers:",
        "",
        "- Art. 3: direct financial loss above EUR 500 000 or 5 % of annual turnover (the lower); exfiltration of "
        "trade secrets; a death or considerable damage to health; successful, suspectedly malicious and "
        "unauthorised access to network and information systems that can cause severe operational disruption. "
        "Art. 4: recurring incidents with the same apparent root cause (at least twice in 6 months) that together "
        "reach the financial threshold.",
        "- Art. 7 (cloud computing services): the service completely unavailable for more than 30 minutes; limited "
        "for more than 5 % of its EU users or more than 1 million of them (the lower) for more than an hour; the "
        "integrity, confidentiality or authenticity of its data compromised by a suspectedly malicious action.",
        "- Scheduled maintenance is not an incident.",
        "",
        "For Anker that means, for example: anyone but an operator reaching the Ray dashboard, job API, GCS or client "
        "port (remote code execution on the cluster); a leaked admin token, HMAC secret or Ray token; one "
        "organisation seeing another's data; every model unavailable for more than 30 minutes; ledger rows lost or "
        "altered.",
        "",
    ]
    return "\n".join(out)
