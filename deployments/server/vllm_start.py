"""Starting vLLM in an engine replica: the engine's spec from the config, its ``AsyncLLM``, the scheduler figures
it reports, and Serve's replica log kept through vLLM's start."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.cpu_pinning import workers_cores_free

SERVE_LOGGER = "ray.serve"  # the logger Serve writes a replica's log file with


@dataclass(frozen=True)
class EngineSpec:
    """Everything one engine replica needs, resolved from the config by the builder."""

    model: str
    path: Path
    max_model_len: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    engine_args: dict[str, Any]


@dataclass
class SchedulerGauge:
    """The latest scheduler figures vLLM reported: queue depth and KV-cache use of this replica."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


def gauge_stat_logger(gauge: SchedulerGauge) -> Any:
    """A vLLM stat-logger factory that copies each step's scheduler stats into ``gauge``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _GaugeLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is not None:
                gauge.running = scheduler_stats.num_running_reqs
                gauge.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                gauge.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return _GaugeLogger


def start_llm(args: Any, stat_loggers: list[Any]) -> Any:
    """The ``AsyncLLM`` of ``AsyncEngineArgs``; a hybrid model's block size is held as if the profile had set it.

    vLLM's hybrid models (attention beside Gated-DeltaNet or Mamba layers; Qwen3-Next, Qwen3.5) keep a recurrent
    state only at block bounds, and in its ``align`` cache mode the scheduler ends a prefill chunk at the last bound
    it may cache. Left unset, the block size is the CPU platform's 128 in the scheduler while the cache aligns its
    blocks to the recurrent state's page whenever that page is larger than an attention block's (256 tokens on
    ``qwen3-next-tiny`` with a float32 state): a first sighting's chunk ends on a
    128 bound the cache cannot keep (1,408 of 1,500 tokens), and only a third sighting of a prompt hits. Held, the
    worker's alignment sets one block size for both, so a prompt's first repeat hits (1,280 of 1,500 tokens;
    ``tests/test_hybrid_prefix_cache.py``). A ``block_size`` in the profile's engine arguments is held anyway.
    """
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    with serve_logs_kept():
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        if config.model_config.is_hybrid:
            config.cache_config.user_specified_block_size = True
        with workers_cores_free():
            return AsyncLLM.from_vllm_config(
                config,
                stat_loggers=stat_loggers,
                enable_log_requests=args.enable_log_requests,
                disable_log_stats=args.disable_log_stats,
            )


@contextlib.contextmanager
def serve_logs_kept() -> Iterator[None]:
    """Keeps the replica's Serve log file through vLLM's start.

    vLLM applies its logging config with ``logging.config.dictConfig`` as it builds the engine's config, and
    ``dictConfig`` closes every handler of the process. Serve's replica logger writes through a ``MemoryHandler``,
    which a close leaves without its file: from then on the replica's log lines (its usage lines among them) are
    neither written nor dropped, but kept in memory, one more per line, for as long as the replica runs. The file
    handler reopens its file on its next line once it is the target again."""
    handlers = [
        (handler, handler.target)
        for handler in logging.getLogger(SERVE_LOGGER).handlers
        if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None
    ]
    try:
        yield
    finally:
        for handler, target in handlers:
            if handler.target is None:
                handler.setTarget(target)
                handler.flush()
