"""The profile schema: one frozen pydantic model of Anker, its models, parallelism, replicas, prices, server, Ray,
billing and data folder, with defaults and validation.

The ground floor: it imports nothing of Anker. Loading a profile (YAML and environment overrides) is
``config.settings``; names derived from it are ``config.naming``.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ServedName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
Port = Annotated[int, Field(ge=1, le=65535)]
# The latency histograms' bucket boundaries (observability.metrics); an SLO threshold must be one of them, so that
# the alert rules can count slow requests from the buckets.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # the cores a vLLM CPU worker binds to: "0-3", "0,2|1,3", "auto", …


def omp_bind_cpus(bind: str) -> set[int]:
    """The CPUs an explicit ``VLLM_CPU_OMP_THREADS_BIND`` names (ranks apart with ``|``); none for auto or nobind."""
    cpus: set[int] = set()
    if bind in ("", "auto", "nobind"):
        return cpus
    for part in bind.replace("|", ",").split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the offending field."""


def _distinct_ports(named: dict[str, int], check: Callable[[str, int], None] = lambda name, port: None) -> None:
    """Refuses two of the ``named`` ports that are one port; ``check`` refuses a port for reasons of its own."""
    seen: dict[int, str] = {}
    for name, port in named.items():
        if port in seen:
            raise ValueError(f"{name} and {seen[port]} are both {port}")
        check(name, port)
        seen[port] = name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prices(_Strict):
    """DKK per 1M tokens. Decimal in the file and here; billing turns them into integer nano-DKK per token."""

    input_uncached_dkk_per_mtok: Decimal = Field(default=Decimal("6.00"), ge=0)
    input_cached_dkk_per_mtok: Decimal = Field(default=Decimal("3.00"), ge=0)
    output_dkk_per_mtok: Decimal = Field(default=Decimal("45.00"), ge=0)

    @field_validator("*", mode="before")
    @classmethod
    def _no_float_money(cls, value: Any) -> Any:
        # YAML turns 6.00 into a float; go through its shortest repr so that 6.00 is exactly Decimal("6.0").
        return Decimal(repr(value)) if isinstance(value, float) else value


class AutoscalingSettings(_Strict):
    """Queue-depth autoscaling of a model's engine replicas (used when min_replicas < max_replicas)."""

    target_queue_per_replica: float = Field(default=8.0, gt=0, description="vLLM waiting + running per replica.")
    max_kv_cache_usage: float = Field(default=0.90, gt=0, le=1, description="A replica this full asks for one more.")
    upscale_delay_s: float = Field(default=10.0, ge=0, description="How long more load must last before scaling up.")
    downscale_delay_s: float = Field(default=120.0, ge=0, description="How long less load must last to scale down.")
    look_back_period_s: float = Field(default=10.0, gt=0, description="Window over which replica metrics average.")


class RouterSettings(_Strict):
    """How a request finds one of a model's engine replicas (deployments/router.py, deployments/server/route.py)."""

    policy: Literal["prefix_aware", "power_of_two"] = Field(
        default="prefix_aware",
        description="prefix_aware: the replica that already holds the longest prefix of the prompt in its KV cache; "
        "power_of_two: no ingress request router, HAProxy balances the replicas by their open connections.",
    )
    max_imbalance: int = Field(
        default=8,
        ge=0,
        description="A prefix match is ignored when its replica has this many more requests in flight than the "
        "least loaded replica.",
    )
    max_blocks: int = Field(
        default=200_000, ge=1, description="Prefix blocks the router remembers (least recently used are forgotten)."
    )


class Hardware(_Strict):
    """The node shape a GPU model's replicas run on: for placement, capacity plans and cluster definitions."""

    gpu_type: str = Field(default="H200", description="Accelerator name, also the node label `anker/gpu`.")
    gpu_memory_gib: float = Field(default=141.0, gt=0, description="Memory of one GPU.")
    gpus_per_node: int = Field(default=8, ge=1, le=64)
    cpus_per_node: int = Field(default=96, ge=1)
    memory_gib_per_node: int = Field(default=1536, ge=1)
    gpu_hour_price_dkk: Decimal = Field(default=Decimal("25.00"), ge=0, description="For `anker plan`.")


class ServingOptions(_Strict):
    """vLLM's OpenAI-server options the checkpoint needs (names checked against vLLM's parser registries)."""

    reasoning_parser: str | None = None
    tool_call_parser: str | None = None


class ModelFacts(_Strict):
    """Figures of the checkpoint that memory plans rest on (from its config.json), for `anker plan`."""

    parameters_b: float = Field(gt=0, description="Total parameters, in billions.")
    expert_parameters_b: float = Field(default=0.0, ge=0, description="Of which routed-expert weights.")
    bytes_per_parameter: float = Field(gt=0, description="2 for BF16, about 1 for FP8 (scales included).")
    full_attention_layers: int = Field(ge=0, description="Layers that keep a KV cache per token.")
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    kv_cache_bytes_per_element: float = Field(default=2.0, gt=0, description="2 for BF16 KV, 1 for FP8 KV.")
    linear_attention_layers: int = Field(default=0, ge=0, description="Gated DeltaNet layers: state per sequence.")
    linear_value_heads: int = Field(default=0, ge=0)
    linear_key_head_dim: int = Field(default=0, ge=0)
    linear_value_head_dim: int = Field(default=0, ge=0)
    linear_state_bytes_per_element: float = Field(default=2.0, gt=0)


class ModelConfig(_Strict):
    """One served model: where its weights are, how its engine is shaped, how many replicas, what it costs."""

    name: ServedName = Field(description="Served name, the `model` field clients send.")
    path: Path = Field(description="Checkpoint folder; relative paths are under the data folder.")
    build: Literal["qwen3-next", "qwen3-moe"] | None = Field(
        default=None, description="Build a tiny random-weight model of this architecture at `path` if it is missing."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64)
    data_parallel_size: int = Field(
        default=1, ge=1, le=64, description="vLLM data-parallel ranks inside one replica (attention DP for MoE)."
    )
    enable_expert_parallel: bool = Field(default=False, description="Shard MoE experts over the DP x TP ranks.")
    max_model_len: int = Field(default=2048, ge=16)
    min_replicas: int = Field(default=1, ge=1, description="Floor of engine replicas; never 0, the service is 24/7.")
    max_replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments (AsyncEngineArgs fields)."
    )
    engine_env: dict[str, str] = Field(default_factory=dict, description="Environment of the engine replica.")
    kv_cache_space_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU engines.")
    engine_num_cpus: float = Field(default=1.0, ge=0, description="Ray logical CPUs per engine replica.")
    accelerator: Literal["cpu", "gpu"] = "cpu"
    owned_by: str = "anker"
    region: str = Field(
        default="dk",
        pattern=r"^[a-z0-9-]{1,32}$",
        description="Where the model's GPUs are; a key's allow-list may admit models by region (region:dk).",
    )
    residency: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]{1,32}$",
        description="If set, engine replicas run only on nodes labelled `anker/region=<residency>` (data residency).",
    )
    hardware: Hardware = Field(default_factory=Hardware)
    facts: ModelFacts | None = Field(default=None, description="Checkpoint figures for capacity plans.")
    serving: ServingOptions = Field(default_factory=ServingOptions)
    prices: Prices = Field(default_factory=Prices)

    @model_validator(mode="after")
    def _replica_bounds(self) -> ModelConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.residency is not None and self.residency != self.region:
            raise ValueError(f"residency {self.residency} must be the model's region ({self.region})")
        reserved = {
            "model",
            "tokenizer",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "enable_expert_parallel",
            "max_model_len",
        }
        clash = sorted(reserved & set(self.engine_args))
        if clash:
            raise ValueError(f"engine_args may not set {', '.join(clash)}: use the model's own fields")
        return self

    @property
    def workers_per_replica(self) -> int:
        """vLLM worker processes of one replica: one per GPU on GPU engines."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    @property
    def gpus_per_replica(self) -> int:
        return self.workers_per_replica if self.accelerator == "gpu" else 0


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Port = 8000
    request_timeout_s: float = Field(
        default=590.0,
        gt=0,
        description="How long the engine may take over a whole (non-streamed) answer, and over a stream's first "
        "output: queue, prefill and, for a whole answer, decoding. Past it, a whole request gets 504 engine_timeout "
        "and a stream an engine_timeout error event, and the engine stops working on it. Below the official OpenAI "
        "SDKs' default timeout of 600 s, so that their clients hear the 504 rather than give up first.",
    )
    stream_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a stream may wait for its next output once its first has come: past it, the stream "
        "ends with an engine_timeout error event, the engine stops working on it, and what it was sent is billed.",
    )
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    log_requests: bool = Field(
        default=False,
        description="One log line per model call from its engine replica: its ids, status and token counts, never "
        "its content. Off by default: no access log on the hot path (it cost an engine replica 4-8 % of its CPU a "
        "request); every call's usage is in the ledger and its span either way.",
    )
    haproxy_metrics_port: Port = Field(default=9101, description="HAProxy's Prometheus listener (loopback).")
    haproxy_stats_port: Port = Field(default=8404, description="HAProxy's stats page (loopback).")
    fallback_proxy_port: Port = Field(
        default=8500,
        description="Serve's own HTTP proxy behind HAProxy (loopback), which HAProxy falls back to when no engine "
        "replica can take a request. Serve binds it with SO_REUSEPORT: two stacks on one host that share this port "
        "serve each other's requests, so each needs its own (Serve's default: 8500).",
    )
    haproxy_deregistration_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a stopping engine replica stays reachable behind HAProxy, so that every HAProxy "
        "takes it out of its servers before it stops taking connections (Serve's default: 30 s).",
    )

    @model_validator(mode="after")
    def _ports_apart(self) -> ServerConfig:
        named = {
            "port": self.port,
            "haproxy_metrics_port": self.haproxy_metrics_port,
            "haproxy_stats_port": self.haproxy_stats_port,
            "fallback_proxy_port": self.fallback_proxy_port,
        }
        _distinct_ports(named)
        return self


class RayConfig(_Strict):
    """The local Ray head that `anker up` starts. Port 6379 is never used: it is Redis's, and often taken."""

    num_cpus: int = Field(default=8, ge=1, description="Logical CPUs the head advertises (not the real core count).")
    gcs_port: Port = 6380
    dashboard_host: str = "127.0.0.1"
    dashboard_port: Port = 8265
    client_server_port: Port = 10001
    dashboard_agent_listen_port: Port = 52365
    metrics_export_port: Port = 8080
    min_worker_port: Port = 10002
    max_worker_port: Port = 19999
    temp_dir: str | None = Field(
        default=None,
        description="Ray's folder of sessions and sockets (short: a socket's path has at most 107 bytes); Ray's "
        "own default if unset.",
    )
    cpu_affinity: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        min_length=1,
        description="CPUs the head and every process it starts run on once the stack serves: Ray's own, Serve's, "
        "HAProxy and the replicas. A vLLM CPU worker binds to the cores its VLLM_CPU_OMP_THREADS_BIND names and "
        "shares them only with its engine core, which drives it. Unset: every CPU.",
    )

    @field_validator("gcs_port")
    @classmethod
    def _not_redis_port(cls, port: int) -> int:
        if port == 6379:
            raise ValueError("Ray must not use port 6379")
        return port

    @model_validator(mode="after")
    def _ports_apart(self) -> RayConfig:
        named = {
            "gcs_port": self.gcs_port,
            "dashboard_port": self.dashboard_port,
            "client_server_port": self.client_server_port,
            "dashboard_agent_listen_port": self.dashboard_agent_listen_port,
            "metrics_export_port": self.metrics_export_port,
        }
        if self.max_worker_port < self.min_worker_port:
            raise ValueError("max_worker_port is below min_worker_port")

        def outside_workers(name: str, port: int) -> None:
            if self.min_worker_port <= port <= self.max_worker_port:
                raise ValueError(
                    f"{name} {port} lies in the worker port range {self.min_worker_port}-{self.max_worker_port}"
                )

        _distinct_ports(named, outside_workers)
        return self


class StackConfig(_Strict):
    """Per-deployment sizing: small enough that the whole stack fits on a 2-core machine."""

    control_num_cpus: float = Field(default=0.25, ge=0, description="Per replica of the control application.")
    control_replicas: int = Field(default=1, ge=1, description="Replicas of the control application (at /).")
    router_num_cpus: float = Field(
        default=0.25, ge=0, description="Per replica of a model's ingress request router (it tokenizes prompts)."
    )
    router_replicas: int = Field(
        default=1, ge=1, description="Replicas of each ingress request router (a model with max_replicas > 1)."
    )
    prefix_block_size: int = Field(default=16, ge=1, description="Tokens per block hash the router weighs.")
    engine_max_ongoing_requests: int = Field(default=64, ge=1, description="Requests one engine replica takes at once.")
    engine_max_queued_requests: int = Field(
        default=256,
        ge=1,
        description="Requests an engine replica holds beyond engine_max_ongoing_requests: it takes "
        "engine_max_ongoing_requests + this many calls at once (what vLLM does not run yet waits in its queue); "
        "beyond that, clients get 503 engine_overloaded with Retry-After at once.",
    )
    overload_retry_after_s: int = Field(default=2, ge=1, description="Retry-After of an engine_overloaded answer.")
    drain_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="On `anker down` or scale-in, how long running requests may take to finish (graceful drain).",
    )
    # Serve's default of 5 would cap each control replica at 5 requests at once: it only waits on I/O.
    control_max_ongoing_requests: int = Field(default=1000, ge=1)
    router_max_ongoing_requests: int = Field(default=256, ge=1)
    startup_timeout_s: float = Field(default=600.0, gt=0)


class BillingConfig(_Strict):
    """Rate-limit defaults, invoice VAT and the billing actor's timings."""

    default_rpm: int = Field(default=600, ge=1, description="Requests per minute of a key without its own limit.")
    default_tpm: int = Field(default=2_000_000, ge=1, description="Tokens per minute of a key without its own limit.")
    vat_percent: Decimal = Field(default=Decimal("25"), ge=0, description="VAT on invoices (Danish moms: 25 %).")
    lease_ttl_s: float = Field(
        default=30.0,
        ge=3,
        description="A budget lease that its engine replica stops renewing (it died, or lost billing) lapses this "
        "long after its last renewal, and what it held goes back to the budget.",
    )
    key_cache_ttl_s: float = Field(default=10.0, ge=0, description="How long the ingress trusts a verified key.")
    usage_flush_interval_s: float = Field(default=0.2, gt=0, description="How often the ingress sends usage.")
    num_cpus: float = Field(default=0.1, ge=0, description="Ray logical CPUs of the billing actor.")
    retention_months: int = Field(
        default=60,
        ge=1,
        description="How long the ledger, prices, budgets and audit log are kept: months back from the current "
        "month, then to the start of that year (bookkeeping records: the Danish bogføringslov asks for 5 years from "
        "the end of the financial year). The billing actor deletes older rows daily; `anker compliance report` "
        "states it.",
    )

    @field_validator("vat_percent", mode="before")
    @classmethod
    def _no_float(cls, value: Any) -> Any:
        if isinstance(value, float):
            raise ValueError("write VAT as a string or integer (exact), not a float")
        return value


class ObservabilityConfig(_Strict):
    """Service-level objectives the alert rules watch, and where the Ray dashboard finds Prometheus and Grafana."""

    ttft_slo_s: float = Field(
        default=2.5, gt=0, description="A first token later than this is slow (a latency-histogram bucket boundary)."
    )
    ttft_slo_target: float = Field(default=0.99, gt=0, lt=1, description="Share of requests with a fast first token.")
    availability_target: float = Field(default=0.999, gt=0, lt=1, description="Share of requests without a 5xx.")
    queue_alert_for_minutes: int = Field(default=10, ge=1)
    pending_usage_alert_for_minutes: int = Field(default=10, ge=1)
    prometheus_host: str | None = Field(default=None, description="RAY_PROMETHEUS_HOST for the Ray dashboard.")
    grafana_host: str | None = Field(default=None, description="RAY_GRAFANA_HOST for the Ray dashboard.")
    grafana_iframe_host: str | None = Field(default=None, description="RAY_GRAFANA_IFRAME_HOST (browser's view).")

    @field_validator("ttft_slo_s")
    @classmethod
    def _a_bucket(cls, value: float) -> float:
        if value not in LATENCY_BUCKETS_S:
            raise ValueError(f"must be one of the latency buckets {list(LATENCY_BUCKETS_S)}")
        return value


class AnkerConfig(_Strict):
    data_dir: Path = Path(".anker")
    database_url: str | None = Field(
        default=None,
        description="postgresql://user@host/db for PostgreSQL; unset: SQLite file anker.db in the data folder.",
    )
    secrets_dir: Path | None = Field(
        default=None,
        description=(
            "Folder with the key secret (hmac.key) and the admin token (admin.token), e.g. a mounted Kubernetes "
            "Secret: they are read, never made, there. Unset: the data folder's secrets/, made on first use."
        ),
    )
    server: ServerConfig = Field(default_factory=ServerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    stack: StackConfig = Field(default_factory=StackConfig)
    billing: BillingConfig = Field(default_factory=BillingConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> AnkerConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _workers_cores_apart(self) -> AnkerConfig:
        """A CPU worker's bound cores lie outside the head's: the point of pinning the head is to leave them free."""
        head = set(self.ray.cpu_affinity or ())
        for m in self.models:
            bind = m.engine_env.get(OMP_BIND_ENV, "")
            shared = sorted(head & omp_bind_cpus(bind))
            if shared:
                raise ValueError(
                    f"model {m.name}: {OMP_BIND_ENV} {bind!r} shares CPUs {shared} with ray.cpu_affinity; a vLLM "
                    "CPU worker's cores must be its own"
                )
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def model_path(self, model: ModelConfig) -> Path:
        return model.path if model.path.is_absolute() else self.data_dir / model.path

    @property
    def secrets_path(self) -> Path:
        """Where the key secret and the admin token are: ``secrets_dir``, else the data folder's ``secrets/``."""
        return self.secrets_dir if self.secrets_dir is not None else self.data_dir / "secrets"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"
