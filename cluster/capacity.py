"""Capacity arithmetic for GPU profiles: weights per GPU, KV cache per token, linear-attention state per sequence,
KV capacity, GPUs and nodes per replica, and cost per hour against token revenue.

Pure functions of the config (and a load assumption); the figures written beside each production profile come from
here, and a test keeps them in step. Decimal for money, as everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from config.placement import engine_placement
from config.schema import ModelConfig, ModelFacts

GB = 10**9
GIB = 2**30
GPU_MEMORY_UTILIZATION = 0.90  # vLLM's default share of GPU memory for weights + activations + KV cache
ACTIVATION_RESERVE_GIB = 6.0  # per GPU: CUDA graphs, activations, NCCL buffers (vLLM's profiling run decides)


def weights_bytes(facts: ModelFacts) -> float:
    return facts.parameters_b * 1e9 * facts.bytes_per_parameter


def kv_bytes_per_token(facts: ModelFacts) -> float:
    """K and V, per full-attention layer, per KV head: the cache a token costs (linear layers keep none)."""
    return 2 * facts.full_attention_layers * facts.kv_heads * facts.head_dim * facts.kv_cache_bytes_per_element


def linear_state_bytes_per_sequence(facts: ModelFacts) -> float:
    """Gated DeltaNet keeps a fixed recurrent state per sequence and layer: value heads x key dim x value dim."""
    return (
        facts.linear_attention_layers
        * facts.linear_value_heads
        * facts.linear_key_head_dim
        * facts.linear_value_head_dim
        * facts.linear_state_bytes_per_element
    )


@dataclass(frozen=True)
class ReplicaPlan:
    gpus: int
    nodes: int
    weights_gb: float
    weights_per_gpu_gb: float
    kv_bytes_per_token: float
    linear_state_mib_per_sequence: float
    kv_cache_gib: float  # left for KV cache and linear state in the whole replica
    kv_tokens: int  # tokens of KV cache that fit if every byte went to it
    sequences_at_full_context: int  # sequences of max_model_len tokens that fit (KV + linear state)


def replica_plan(model: ModelConfig) -> ReplicaPlan:
    if model.facts is None:
        raise ValueError(f"model {model.name} has no `facts`: capacity needs the checkpoint's figures")
    facts = model.facts
    placement = engine_placement(model)
    gpus = model.gpus_per_replica
    weights = weights_bytes(facts)
    # TP and PP split every weight; DP replicates the dense part and, with expert parallelism, splits the experts.
    if model.data_parallel_size > 1:
        expert = facts.expert_parameters_b * 1e9 * facts.bytes_per_parameter
        dense = weights - expert
        per_gpu = dense / (model.tensor_parallel_size * model.pipeline_parallel_size) + (
            expert / gpus if model.enable_expert_parallel else expert
        )
    else:
        per_gpu = weights / gpus
    usable = model.hardware.gpu_memory_gib * GIB * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_GIB * GIB
    kv_total = max(0.0, (usable - per_gpu) * gpus)
    per_token = kv_bytes_per_token(facts)
    state = linear_state_bytes_per_sequence(facts)
    per_sequence = per_token * model.max_model_len + state
    return ReplicaPlan(
        gpus=gpus,
        nodes=placement.nodes,
        weights_gb=weights / GB,
        weights_per_gpu_gb=per_gpu / GB,
        kv_bytes_per_token=per_token,
        linear_state_mib_per_sequence=state / 2**20,
        kv_cache_gib=kv_total / GIB,
        kv_tokens=int(kv_total // per_token) if per_token else 0,
        sequences_at_full_context=int(kv_total // per_sequence) if per_sequence else 0,
    )


@dataclass(frozen=True)
class CostPlan:
    replicas: int
    gpus: int
    nodes: int
    cost_per_hour_dkk: Decimal
    revenue_per_hour_dkk: Decimal


def money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def cost_plan(
    model: ModelConfig, replicas: int, input_tokens_per_s: Decimal, output_tokens_per_s: Decimal, cached_share: Decimal
) -> CostPlan:
    """GPU cost per hour of ``replicas`` replicas, and the token revenue per hour of the given load."""
    plan = replica_plan(model)
    nodes = replicas * plan.nodes if plan.nodes > 1 else math.ceil(replicas * plan.gpus / model.hardware.gpus_per_node)
    cost = Decimal(replicas * plan.gpus) * model.hardware.gpu_hour_price_dkk
    p = model.prices
    per_million = Decimal(10**6)
    hour = Decimal(3600)
    revenue = hour * (
        input_tokens_per_s * (1 - cached_share) * p.input_uncached_dkk_per_mtok / per_million
        + input_tokens_per_s * cached_share * p.input_cached_dkk_per_mtok / per_million
        + output_tokens_per_s * p.output_dkk_per_mtok / per_million
    )
    return CostPlan(replicas, replicas * plan.gpus, nodes, money(cost), money(revenue))


def figures(model: ModelConfig) -> list[str]:
    """The comment lines written beside a production profile (a test checks the file still says this)."""
    plan = replica_plan(model)
    facts = model.facts
    assert facts is not None
    kv_element = f"{facts.kv_cache_bytes_per_element:g} B"
    return [
        "# Figures (cluster/capacity.py; tests/test_capacity.py keeps them in step with the config below):",
        f"#   weights {plan.weights_gb:,.0f} GB, {plan.weights_per_gpu_gb:,.1f} GB per GPU; "
        f"{plan.gpus} GPUs on {plan.nodes} node{'s' if plan.nodes > 1 else ''} per replica",
        f"#   KV cache {plan.kv_bytes_per_token:,.0f} B per token ({facts.full_attention_layers} full-attention layers "
        f"x {facts.kv_heads} KV heads x {facts.head_dim} x K,V x {kv_element}); Gated DeltaNet state "
        f"{plan.linear_state_mib_per_sequence:,.0f} MiB per sequence",
        f"#   left for the cache at {GPU_MEMORY_UTILIZATION:.0%} GPU memory: {plan.kv_cache_gib:,.0f} GiB per replica "
        f"= {plan.kv_tokens / 1e6:,.1f}M tokens, or {plan.sequences_at_full_context:,} sequences at the full "
        f"{model.max_model_len:,}-token context",
    ]
