"""The builder: the only place that knows the whole graph. It turns an ``AnkerConfig`` into bound Serve apps.

``build_apps``: a control application at ``/`` that holds the billing actor, and one application per model whose
engine replicas serve HTTP themselves (with an ingress request router when the model may run more than one
replica); they reach the billing actor by its application and deployment name, since Serve keeps an application's
deployments its own. Deployments receive their specs here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from autoscaling.queue_policy import QueuePolicyConfig, serve_autoscaling_config
from config.naming import (
    APP_NAME,
    engine_deployment_name,
    model_app_name,
    model_route_prefix,
    router_deployment_name,
)
from config.placement import engine_placement
from config.schema import AnkerConfig, ModelConfig
from deployments.billing.actor import Billing
from deployments.billing.service import billing_spec
from deployments.control import ControlServer, ControlSpec, ModelApp
from deployments.openai.catalog import ServedModel, model_card
from deployments.server.metering import Deadlines
from deployments.server.replica import EngineServer, ReplicaSpec
from deployments.server.route import IngressRouter, RouteSpec
from deployments.server.vllm_layer import EngineClientDouble, ServingSpec
from deployments.server.vllm_start import EngineSpec

# Serve's access log writes a line per request: not on the hot path (nor, under zero data retention, anywhere).
NO_ACCESS_LOG = {"enable_access_log": False}

# The engine deployment's request router (Ray Serve's extension point), in the model application's ingress request
# router, which HAProxy asks.
INGRESS_PREFIX_ROUTER = "deployments.router.IngressPrefixRouter"
CAPACITY_HEADROOM = 16  # Serve's limit of calls at once on a replica, above what its door takes
ROUTING_STATS_PERIOD_S = 2.0  # how often Serve asks each engine replica for its queue, which the router weighs


def engine_env(model: ModelConfig) -> dict[str, str]:
    env = {
        # vLLM's engine core is a child process of the replica; spawn keeps it clear of Ray's threads.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "VLLM_CPU_KVCACHE_SPACE": str(model.kv_cache_space_gib),
        "TOKENIZERS_PARALLELISM": "false",
        # Serve's throughput-optimized mode buffers a replica's log lines until 1,000 are waiting; with no access
        # log, a replica's lines are its requests' usage lines and its own events, written as they happen.
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    }
    env.update(model.engine_env)
    return env


def engine_autoscaling(model: ModelConfig) -> dict[str, Any]:
    """Serve's autoscaling config of a model's engine deployment: the queue-depth policy, floor >= 1."""
    a = model.autoscaling
    policy = QueuePolicyConfig(
        target_queue_per_replica=a.target_queue_per_replica,
        max_kv_cache_usage=a.max_kv_cache_usage,
        upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s,
        min_replicas=model.min_replicas,
        max_replicas=model.max_replicas,
    )
    return serve_autoscaling_config(policy, a.look_back_period_s)


def _ray_executor(model: ModelConfig) -> bool:
    return model.accelerator == "gpu" and model.workers_per_replica > 1


def engine_spec(config: AnkerConfig, model: ModelConfig) -> EngineSpec:
    engine_args = dict(model.engine_args)
    if model.data_parallel_size > 1:
        engine_args["data_parallel_size"] = model.data_parallel_size
    if model.enable_expert_parallel:
        engine_args["enable_expert_parallel"] = True
    if _ray_executor(model):
        # vLLM's workers become Ray actors in the replica's placement group (its bundles, made below).
        engine_args.setdefault("distributed_executor_backend", "ray")
        if model.data_parallel_size > 1:
            engine_args.setdefault("data_parallel_backend", "ray")
    return EngineSpec(
        model=model.name,
        path=config.model_path(model),
        max_model_len=model.max_model_len,
        tensor_parallel_size=model.tensor_parallel_size,
        pipeline_parallel_size=model.pipeline_parallel_size,
        engine_args=engine_args,
    )


def engine_deadlines(config: AnkerConfig) -> Deadlines:
    """How long an engine replica's engine may keep a request waiting for its next output."""
    return Deadlines(config.server.request_timeout_s, config.server.stream_idle_timeout_s)


def engine_options(config: AnkerConfig, model: ModelConfig) -> dict[str, Any]:
    """The Serve deployment options of a model's engine: name, replicas or autoscaling, resources, placement."""
    placement = engine_placement(model)
    scaling: dict[str, Any] = (
        {"num_replicas": model.min_replicas}
        if model.min_replicas == model.max_replicas
        else {"autoscaling_config": engine_autoscaling(model)}
    )
    options: dict[str, Any] = {
        "name": engine_deployment_name(model),
        **scaling,
        "max_ongoing_requests": config.stack.engine_max_ongoing_requests,
        "max_queued_requests": config.stack.engine_max_queued_requests,
        "graceful_shutdown_timeout_s": config.stack.drain_timeout_s,
        "ray_actor_options": {
            "num_cpus": placement.bundles[0].get("CPU", 0.0),
            # With vLLM's Ray executor every GPU belongs to a worker actor (the first bundle's GPU to worker 0);
            # the replica only holds CPUs. A single-GPU engine runs inside the replica and holds its GPU.
            "num_gpus": 0.0 if _ray_executor(model) else placement.bundles[0].get("GPU", 0.0),
            "runtime_env": {"env_vars": engine_env(model)},
        },
        "placement_group_bundles": [dict(b) for b in placement.bundles],
        "placement_group_strategy": placement.strategy,
    }
    if placement.label_selector is not None:
        options["placement_group_bundle_label_selector"] = [dict(placement.label_selector)]
    return options


def prefix_router_config(model: ModelConfig) -> RequestRouterConfig:
    """Serve's request-router settings for a model's engine deployment, with the model's prefix-routing policy."""
    return RequestRouterConfig(
        request_router_class=INGRESS_PREFIX_ROUTER,  # type: ignore[arg-type]
        request_router_kwargs={
            "model": model.name,
            "max_imbalance": model.router.max_imbalance,
            "max_blocks": model.router.max_blocks,
        },
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class ServeApp:
    """One Serve application of the graph: ``serve.run(app, name=name, route_prefix=...)``."""

    name: str
    route_prefix: str
    app: serve.Application


def served_models(config: AnkerConfig, created: int) -> tuple[ServedModel, ...]:
    return tuple(ServedModel(m.name, m.max_model_len, m.owned_by, created, m.region) for m in config.models)


def model_app(
    config: AnkerConfig, model: ModelConfig, created: int, engine_client_double: EngineClientDouble | None = None
) -> ServeApp:
    """A model's own application: its engine replicas serve the OpenAI API themselves (the application's ingress)."""
    options = engine_options(config, model)
    # HAProxy asks the model's own router, if the model may run more than one replica.
    routed = model.max_replicas > 1 and model.router.policy == "prefix_aware"
    if routed:
        options["request_router_config"] = prefix_router_config(model)
    options["logging_config"] = NO_ACCESS_LOG
    # The replica's door refuses what it cannot take (back-pressure in OpenAI's shape); Serve's own limit is above
    # it, so that Serve never queues a call the door would take and a refusal always finds a slot.
    max_calls = config.stack.engine_max_ongoing_requests + config.stack.engine_max_queued_requests
    options["max_ongoing_requests"] = max_calls + CAPACITY_HEADROOM
    served = served_models(config, created)[config.models.index(model)]
    card = model_card(served.name, served.created, served.owned_by, served.max_model_len)
    spec = ReplicaSpec(
        serving=ServingSpec(
            engine_spec(config, model),
            model.serving.reasoning_parser,
            model.serving.tool_call_parser,
            engine_client_double=engine_client_double,
        ),
        model_cards=(card,),
        region=model.region,
        max_body_bytes=config.server.max_request_bytes,
        deadlines=engine_deadlines(config),
        key_cache_ttl_s=config.billing.key_cache_ttl_s,
        usage_flush_interval_s=config.billing.usage_flush_interval_s,
        usage_spool_dir=config.data_dir.resolve() / "outbox",
        billing_app=APP_NAME,
        max_calls=max_calls,
        overload_retry_after_s=config.stack.overload_retry_after_s,
        log_requests=config.server.log_requests,
    )
    app = EngineServer.options(**options).bind(spec)  # type: ignore[attr-defined]
    if routed:
        # Serve's hook for an ingress request router is internal and unstable in 2.60 (Ray Serve LLM's direct
        # streaming uses it): HAProxy asks the router at /internal/route before it sends a request to a replica.
        router = IngressRouter.options(  # type: ignore[attr-defined]
            name=router_deployment_name(model),
            logging_config=NO_ACCESS_LOG,
            num_replicas=config.stack.router_replicas,
            max_ongoing_requests=config.stack.router_max_ongoing_requests,
            ray_actor_options={"num_cpus": config.stack.router_num_cpus},
        ).bind(
            app,
            RouteSpec(config.model_path(model), config.stack.prefix_block_size, config.server.max_request_bytes),
        )
        app = app._with_ingress_request_router(router)
    return ServeApp(model_app_name(model.name), model_route_prefix(model.name), app)


def build_apps(config: AnkerConfig, engine_client_double: EngineClientDouble | None = None) -> list[ServeApp]:
    """The graph: the control application at ``/`` (the billing actor, the model list, usage,
    administration, the dashboard) first, then one application per model at its route prefix, reached through
    HAProxy by the model the request's body names (docs/architecture.md)."""
    created = int(time.time())
    apps = [model_app(config, m, created, engine_client_double) for m in config.models]
    billing = Billing.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": config.billing.num_cpus},
    ).bind(billing_spec(config))
    spec = ControlSpec(
        models=served_models(config, created),
        apps=tuple(
            ModelApp(m.name, a.name, engine_deployment_name(m), a.route_prefix)
            for m, a in zip(config.models, apps, strict=True)
        ),
        max_body_bytes=config.server.max_request_bytes,
        key_cache_ttl_s=config.billing.key_cache_ttl_s,
        usage_flush_interval_s=config.billing.usage_flush_interval_s,
    )
    control = ControlServer.options(  # type: ignore[attr-defined]
        logging_config=NO_ACCESS_LOG,
        num_replicas=config.stack.control_replicas,
        max_ongoing_requests=config.stack.control_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.stack.control_num_cpus},
    ).bind(spec, billing)
    return [ServeApp(APP_NAME, "/", control), *apps]


def app_from_args(args: dict[str, str]) -> serve.Application:
    """Serve's application builder for config files (a KubeRay RayService's serveConfigV2):
    ``import_path: deployments.builder:app_from_args`` with ``args: {config: /etc/anker/profile.yaml, app: <name>}``,
    one entry per application of ``build_apps``, each naming its own."""
    import os

    from config.settings import load_config

    config = load_config(args.get("config"), dict(os.environ))
    apps = {a.name: a.app for a in build_apps(config)}
    if args.get("app") not in apps:
        raise ValueError(f"args.app must name one of this profile's applications: {', '.join(sorted(apps))}")
    return apps[args["app"]]
