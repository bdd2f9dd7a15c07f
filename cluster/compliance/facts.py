"""What the compliance documents state, derived from the config, the database schema and the ``OTEL_*`` environment:
regions and transfers, the database and trace endpoints without credentials, retained columns and retention, and the
technical and organisational measures in force. Pure functions; nothing here opens the database or the network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import sqlalchemy as sa

from config.naming import REGION_LABEL
from config.placement import engine_placement
from config.schema import AnkerConfig, ModelConfig
from deployments.billing.tables import METADATA

EU_EEA = {
    "at": "Austria", "be": "Belgium", "bg": "Bulgaria", "cy": "Cyprus", "cz": "Czechia", "de": "Germany",
    "dk": "Denmark", "ee": "Estonia", "es": "Spain", "fi": "Finland", "fr": "France", "gr": "Greece",
    "hr": "Croatia", "hu": "Hungary", "ie": "Ireland", "it": "Italy", "lt": "Lithuania", "lu": "Luxembourg",
    "lv": "Latvia", "mt": "Malta", "nl": "Netherlands", "pl": "Poland", "pt": "Portugal", "ro": "Romania",
    "se": "Sweden", "si": "Slovenia", "sk": "Slovakia", "is": "Iceland", "li": "Liechtenstein", "no": "Norway",
}  # fmt: skip

# Every table of Anker's database: what it is for, whose data it holds, and which retention rule applies. A table
# missing here fails tests/test_compliance.py, so the record of processing always covers the whole schema.
TABLES: dict[str, tuple[str, str, str]] = {
    "tenants": ("customer organisations, their plans and budgets", "customer organisations", "account"),
    "members": ("the people of an organisation and their roles", "customer staff", "account"),
    "api_keys": ("API keys as keyed hashes, with role, model allow-list, budget and limits", "key holders", "account"),
    "model_prices": ("the price list of each model over time", "none (no personal data)", "ledger"),
    "usage_events": (
        "one row per request: organisation, key, model, token counts, cost, times, status",
        "key holders, and through them the customer's end users",
        "ledger",
    ),
    "usage_set_aside": (
        "usage reports billing could not record, with a reason code: counts, ids, times (never content)",
        "key holders, and through them the customer's end users",
        "ledger",
    ),
    "budget_spend": ("running spend per budget and month", "customer organisations, key holders", "ledger"),
    "budget_leases": ("the part of a budget an engine replica holds for its requests", "key holders", "transient"),
    "audit_log": ("who changed which setting, and when", "customer staff, operators", "ledger"),
}


@dataclass(frozen=True)
class Measure:
    """A technical or organisational measure as the config and the code set it; ``ok`` False is a point to act on."""

    text: str
    where: str
    ok: bool = True


@dataclass(frozen=True)
class Region:
    code: str
    place: str
    in_eea: bool


@dataclass(frozen=True)
class Database:
    kind: str
    where: str  # host:port/name or a file path, never a user or password
    host: str | None
    tls: Measure


def region(code: str) -> Region:
    """A model's ``region`` read as an ISO country code (``dk``, ``se-south``) or ``eu``; anything else is treated
    as outside the EU/EEA until the operator names an EU/EEA country."""
    head = code.split("-", 1)[0]
    if head in EU_EEA:
        return Region(code, EU_EEA[head], True)
    if head == "eu":
        return Region(code, "the EU (no country named)", True)
    if len(head) == 2:
        return Region(code, f"{head.upper()}, outside the EU/EEA (third country)", False)
    return Region(code, "not an EU/EEA country code: treated as a third country", False)


def public_address(url: str) -> str:
    """scheme://host[:port][/path] of a URL: no user, password, query or fragment (any of them may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else "(an address that is not a URL)"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def database(config: AnkerConfig) -> Database:
    """Where the ledger lives, from ``database_url`` (credentials dropped) or the SQLite file in the data folder."""
    local = Measure("the database is a file in the data folder: no network", "deployments/database.py")
    if not config.database_url:
        return Database("SQLite", str(config.data_dir / "anker.db"), None, local)
    try:
        url = sa.engine.make_url(config.database_url)
    except sa.exc.ArgumentError:
        return Database("unknown", "(a database URL that cannot be parsed)", None, Measure("unknown", "", ok=False))
    backend = url.get_backend_name()
    if backend == "sqlite":
        return Database("SQLite", url.database or "(in memory)", None, local)
    where = f"{url.host or 'localhost'}{f':{url.port}' if url.port else ''}/{url.database or ''}"
    sslmode = str(url.query.get("sslmode", ""))
    if sslmode in ("verify-full", "verify-ca", "require"):
        tls = Measure(f"TLS to the database is required (`sslmode={sslmode}`)", "database_url")
    else:
        tls = Measure(
            "the database URL does not require TLS (libpq's default `prefer` falls back to plain text): add "
            "`sslmode=verify-full` unless the database is on the same host",
            "database_url",
            ok=False,
        )
    return Database("PostgreSQL" if backend == "postgresql" else backend, where, url.host, tls)


def otlp_endpoint(environ: Mapping[str, str]) -> str | None:
    """Where spans go (the ``OTEL_*`` variables every Anker process reads), or None when tracing is off."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter == "console":
        return "the processes' standard output (Ray's log files)"
    if exporter != "otlp":
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    default = "http://localhost:4318/v1/traces" if protocol.startswith("http") else "http://localhost:4317"
    raw = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or default
    return f"{public_address(raw)} (OTLP over {'HTTP' if protocol.startswith('http') else 'gRPC'})"


def retained_columns() -> list[tuple[str, str, str]]:
    """(table, column, SQL type) of every column of Anker's database, in schema order."""
    return [(t.name, c.name, str(c.type)) for t in METADATA.sorted_tables for c in t.columns]


def retention(config: AnkerConfig, rule: str) -> str:
    months = config.billing.retention_months
    if rule == "ledger":
        return f"{months} months (`billing.retention_months`)"
    if rule == "account":
        return (
            "organisations while they are customers; revoked keys and removed members (`revoked_at` / "
            f"`removed_at`) as long as the ledger rows that name them: {months} months"
        )
    return (
        "deleted when its engine replica gives it back, once the usage of its requests is recorded, or "
        f"{config.billing.lease_ttl_s:g} s (`billing.lease_ttl_s`) after the replica last renewed it"
    )


def _engine_flags(model: ModelConfig) -> list[Measure]:
    flags = []
    where = f"models[{model.name}]"
    if model.engine_args.get("enable_log_requests") or model.engine_args.get("enable_log_outputs"):
        flags.append(
            Measure(f"{model.name}: engine_args turn vLLM's request log on: prompts reach the logs", where, False)
        )
    if model.engine_args.get("trust_remote_code"):
        flags.append(
            Measure(f"{model.name}: `trust_remote_code` runs Python code shipped with the checkpoint", where, False)
        )
    if model.engine_env.get("VLLM_ALLOW_INSECURE_SERIALIZATION", "0") not in ("", "0"):
        flags.append(
            Measure(f"{model.name}: `VLLM_ALLOW_INSECURE_SERIALIZATION` turns vLLM's pickle fallback on", where, False)
        )
    if model.residency is None:
        flags.append(
            Measure(
                f"{model.name}: region `{model.region}` is declared, not enforced (no `residency`): its replicas may "
                "run on any node of the cluster",
                where,
                False,
            )
        )
    else:
        flags.append(
            Measure(f"{model.name}: replicas run only on nodes labelled `{REGION_LABEL}={model.residency}`", where)
        )
    if engine_placement(model).nodes > 1:
        flags.append(
            Measure(
                f"{model.name}: one replica spans {engine_placement(model).nodes} nodes; vLLM's traffic between "
                "them (torch.distributed, NCCL) is neither authenticated nor encrypted: the nodes need a network of "
                "their own",
                where,
                False,
            )
        )
    return flags


def measures(config: AnkerConfig) -> list[Measure]:
    """Technical and organisational measures (GDPR Art. 32, NIS2 Art. 21) as this config and the code set them."""
    s, r, b = config.server, config.ray, config.billing
    api = (
        Measure(f"the API listens on loopback only ({s.host}:{s.port}), plain HTTP", "server.host")
        if is_loopback(s.host)
        else Measure(
            f"the API listens on {s.host}:{s.port} in plain HTTP (Ray Serve's proxy has no TLS): a TLS-terminating "
            "proxy must be the only route to it",
            "server.host",
            ok=False,
        )
    )
    dashboard = (
        Measure(
            f"the Ray dashboard and job API listen on loopback only ({r.dashboard_host}:{r.dashboard_port}); on "
            "Kubernetes `anker cluster-defs` binds them to the head pod and admits only the KubeRay operator",
            "ray.dashboard_host, cluster/kuberay.py",
        )
        if is_loopback(r.dashboard_host)
        else Measure(
            f"the Ray dashboard and job API listen on {r.dashboard_host}:{r.dashboard_port}: only operators may reach "
            "it (on Kubernetes the network policies of `anker cluster-defs` admit only the KubeRay operator)",
            "ray.dashboard_host",
            ok=False,
        )
    )
    return [
        Measure(
            "API keys are stored only as HMAC-SHA256 under a server secret (`<data_dir>/secrets/hmac.key`, mode 0600) "
            "and shown once; verification is constant-time",
            "deployments/keys.py",
        ),
        Measure(
            "the operator's admin token is random, kept in a 0600 file and compared by digest in constant time",
            "deployments/billing/service.py",
        ),
        Measure(
            "organisations are isolated: another organisation's objects answer 404; roles limit who manages keys, "
            "members and budgets; every change is in the audit log",
            "deployments/billing/governance.py, tests/test_tenant_isolation.py",
        ),
        Measure(
            f"a verified key is trusted for {b.key_cache_ttl_s:g} s: a revoked key stops within that time", "billing"
        ),
        Measure(
            f"rate limits per key (default {b.default_rpm:,} requests and {b.default_tpm:,} tokens per minute) and "
            "budgets reserved before a request runs",
            "deployments/billing/ratelimit.py, budgets.py",
        ),
        api,
        dashboard,
        Measure(
            "Ray token authentication on every Ray API and internal call; it authenticates but does not encrypt, so "
            "the cluster's nodes need a network of their own",
            "cluster/local.py::ray_auth_env, cluster/kuberay.py (authOptions)",
        ),
        database(config).tls,
        Measure(
            "zero data retention: vLLM's request log is off, log lines, errors, spans and metrics carry ids, model "
            "names and counts, never text; a stack test searches every file, span, metric and ledger row for a canary",
            "deployments/server/vllm_layer.py, observability/tracing.py, tests/test_stack_*",
        ),
        Measure(
            "prompts' KV-cache blocks stay in engine memory after a request for prefix caching (never on disk), "
            "each organisation's under a salt of its own: no organisation hits, or times, another's cached prompts",
            "deployments/server/salt.py, deployments/server/gate.py (vLLM cache_salt)",
        ),
        *[flag for model in config.models for flag in _engine_flags(model)],
    ]
