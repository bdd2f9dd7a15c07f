"""The data flows of an Anker installation, generated from its config: every component with its address or port,
who reaches it and what it carries, engines per model and region, the files in the data folder.
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.compliance.facts import database, otlp_endpoint
from cluster.compliance.markdown import header
from config.naming import REGION_LABEL, engine_deployment_name
from config.placement import engine_placement
from config.schema import AnkerConfig


def data_flows(config: AnkerConfig, environ: Mapping[str, str], source: str, today: str) -> str:
    s, r = config.server, config.ray
    db, otlp = database(config), otlp_endpoint(environ)
    engines = [(m, engine_deployment_name(m)) for m in config.models]
    out = header("Data flows: every component and port", source, today)
    out += ["```mermaid", "flowchart LR"]
    out += [
        f'  client([client]) -- "prompts, completions, API key" --> proxy[Serve proxy {s.host}:{s.port}]',
        '  proxy -- "the request" --> ingress[Ingress]',
        '  ingress -- "text" --> tokenizer[Tokenizer]',
        '  ingress -- "key, counts" --> billing[Billing actor]',
        f'  billing -- "counts, ids, amounts" --> db[("{db.kind} {db.where}")]',
    ]
    for i, (m, name) in enumerate(engines):
        out.append(f'  ingress -- "token ids" --> e{i}[{name} in {m.region}]')
    if otlp:
        out.append('  ingress & billing -. "spans: ids, counts" .-> otlp[OTLP receiver]')
    out += ["```", "", "## Components and ports", "", "| Component | Listens on | Reached by | Carries |"]
    out += ["| --- | --- | --- | --- |"]
    rows = [
        (
            "Ray Serve HTTP proxy",
            f"{s.host}:{s.port} (HTTP)",
            "clients, through a TLS-terminating proxy unless loopback",
            "prompts and completions, the API key (Authorization header)",
        ),
        (
            "Ingress, Tokenizer, Billing actor (Ray actors)",
            f"Ray worker ports {r.min_worker_port}-{r.max_worker_port}",
            "Ray (token auth)",
            "the request in memory; to billing only keys and counts",
        ),
        ("Ray GCS", f"port {r.gcs_port}", "Ray nodes and drivers (token auth)", "cluster state, no request content"),
        (
            "Ray dashboard and job API",
            f"{r.dashboard_host}:{r.dashboard_port}",
            "operators (SSH tunnel, kubectl)",
            "cluster control: running code on the cluster",
        ),
        ("Ray client server", f"port {r.client_server_port}", "Ray clients (token auth)", "cluster control"),
        ("Ray dashboard agent", f"port {r.dashboard_agent_listen_port}", "the dashboard", "node state and logs"),
        (
            "Ray metrics agent",
            f"port {r.metrics_export_port}, every node",
            "Prometheus",
            "metrics: no tenant, key or text",
        ),
        (f"Database ({db.kind})", db.where, "the billing actor; `anker` CLI", "counts, ids, amounts, key digests"),
        ("Traces", otlp or "off", "every Anker process", "spans: ids, organisation, key id, model, counts"),
    ]
    o = config.observability
    if o.prometheus_host or o.grafana_host:
        rows.append(
            (
                "Prometheus / Grafana",
                ", ".join(h for h in (o.prometheus_host, o.grafana_host) if h),
                "the Ray dashboard",
                "metrics",
            )
        )
    for m, name in engines:
        p = engine_placement(m)
        shape = (
            f"TP {m.tensor_parallel_size} x PP {m.pipeline_parallel_size} x DP {m.data_parallel_size}, {m.accelerator}"
        )
        pin = f"only `{REGION_LABEL}={m.residency}` nodes" if m.residency else "any node"
        rows.append(
            (
                f"`{name}` ({m.min_replicas}..{m.max_replicas} replicas)",
                f"Ray worker ports; {shape}; {p.nodes} node(s)",
                f"the ingress; region `{m.region}`, {pin}",
                "token ids in, token ids and text out; KV cache in memory",
            )
        )
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += [
        "",
        "## Files",
        "",
        f"- `{config.data_dir / 'secrets'}`: the HMAC secret, the admin token, the Ray auth token (mode 0600).",
        f"- `{config.data_dir / 'outbox'}`: usage reports waiting for the ledger (counts and ids).",
        f"- `{config.run_dir}`: run state and the Ray head's log; Ray's session folder holds the actors' logs.",
        f"- `{config.data_dir / 'models'}`: checkpoints (relative model paths are under the data folder).",
        "",
        "## What crosses each boundary",
        "",
        "1. client ↔ proxy: the request body (prompt) and the API key in; the completion out.",
        "2. proxy → ingress → tokenizer: the text, inside the Ray cluster; back: token ids and prefix block hashes.",
        "3. ingress ↔ engine: token ids and sampling parameters in; token ids and text deltas out.",
        "4. ingress ↔ billing actor: the API key to verify; counts for admission and for the usage report.",
        f"5. billing actor ↔ database ({db.where}): rows of counts, ids, amounts and key digests; never text.",
        "6. every process → traces and metrics: ids and counts only.",
        "",
    ]
    return "\n".join(out)
