"""The engine stage: one vLLM ``AsyncLLM`` per replica, fed token ids, streaming deltas back to the ingress.

vLLM types stop here: callers send ``Sampling`` and token ids and receive ``Delta`` / ``EngineFailure`` values. A
client's request must never take the engine down, and a request whose caller goes away is aborted in vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import SpanKind, set_span_in_context
from ray import serve

from autoscaling.queue_policy import KV_CACHE_METRIC, QUEUE_METRIC
from deployments.contracts import Delta, EngineFailure, EngineLoad, Sampling, TokenLogprob, TopLogprob
from deployments.server.vllm_start import SERVE_LOGGER, EngineSpec, SchedulerGauge, gauge_stat_logger, start_llm
from observability import metrics, tracing

METRICS_PERIOD_S = 2.0

logger = logging.getLogger(SERVE_LOGGER)


def to_sampling_params(sampling: Sampling, max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=sampling.n,
        max_tokens=max_tokens,
        temperature=1.0 if sampling.temperature is None else sampling.temperature,
        top_p=1.0 if sampling.top_p is None else sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop),
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logprobs=sampling.logprobs,
        output_kind=RequestOutputKind.DELTA,
        skip_special_tokens=True,
    )


def _token_bytes(token: str) -> tuple[int, ...]:
    return tuple(token.encode("utf-8", errors="replace"))


def to_logprobs(token_ids: list[int], positions: Any, top_k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position ``{token_id: Logprob}`` dicts to the contract's values (sampled token + top k)."""
    result = []
    for token_id, candidates in zip(token_ids, positions, strict=False):
        chosen = candidates.get(token_id)
        if chosen is None:
            continue
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        top = tuple(
            TopLogprob(
                token=lp.decoded_token or "",
                logprob=float(lp.logprob),
                token_bytes=_token_bytes(lp.decoded_token or ""),
            )
            for lp in ranked[:top_k]
        )
        token = chosen.decoded_token or ""
        result.append(
            TokenLogprob(token=token, logprob=float(chosen.logprob), token_bytes=_token_bytes(token), top=top)
        )
    return tuple(result)


def to_deltas(output: Any, sampling: Sampling) -> list[Delta]:
    deltas = []
    for choice in output.outputs:
        token_ids = list(choice.token_ids)
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = to_logprobs(token_ids, choice.logprobs or [], sampling.logprobs)
        deltas.append(
            Delta(
                index=choice.index,
                text=choice.text,
                token_ids=tuple(token_ids),
                num_cached_tokens=output.num_cached_tokens or 0,
                finish_reason=choice.finish_reason if choice.finish_reason in ("stop", "length") else None,
                logprobs=logprobs,
            )
        )
    return deltas


class EngineTimings:
    """Where a request's time went in vLLM (queue, prefill, decode), from vLLM's per-request stats; engine-core
    timestamps are monotonic and are turned into wall-clock nanoseconds for spans."""

    def __init__(self) -> None:
        self.queued_s = self.scheduled_s = self.first_token_s = self.last_token_s = 0.0

    def observe(self, stats: Any) -> None:
        self.queued_s = stats.queued_ts or self.queued_s
        self.scheduled_s = stats.scheduled_ts or self.scheduled_s
        self.first_token_s = stats.first_token_ts or self.first_token_s
        self.last_token_s = stats.last_token_ts or self.last_token_s

    def phases_ns(self) -> list[tuple[str, int, int]]:
        """(phase, start, end) in wall-clock ns for the phases that happened."""
        offset = time.time() - time.monotonic()
        marks = [
            ("engine.queue", self.queued_s, self.scheduled_s),
            ("engine.prefill", self.scheduled_s, self.first_token_s),
            ("engine.decode", self.first_token_s, self.last_token_s),
        ]
        return [
            (name, int((start + offset) * 1e9), int((end + offset) * 1e9))
            for name, start, end in marks
            if start and end and end >= start
        ]


class EngineCore:
    """The replica's logic around one ``AsyncLLM``; a plain class so the deployment stays a thin shell."""

    def __init__(self, spec: EngineSpec) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.spec = spec
        args = AsyncEngineArgs(
            model=str(spec.path),
            served_model_name=[spec.model],
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            pipeline_parallel_size=spec.pipeline_parallel_size,
            enable_prefix_caching=True,
            enable_log_requests=False,  # zero data retention: vLLM's request log can carry prompts
            **spec.engine_args,
        )
        self._gauge = SchedulerGauge()
        self._llm = start_llm(args, [gauge_stat_logger(self._gauge)])
        self._active: set[str] = set()
        self._aborted_total = 0

    @property
    def dead(self) -> bool:
        return bool(self._llm.errored)

    async def generate(
        self,
        request_id: str,
        token_ids: tuple[int, ...],
        sampling: Sampling,
        max_tokens: int,
        timings: EngineTimings | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[list[Delta] | EngineFailure]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.dead:
            yield EngineFailure("The model's engine is restarting. Please retry shortly.")
            return
        params = to_sampling_params(sampling, max_tokens)
        prompt = TokensPrompt(prompt_token_ids=list(token_ids))
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        self._active.add(request_id)
        finished = False
        try:
            async for output in self._llm.generate(prompt, params, request_id=request_id):
                finished = output.finished
                if timings is not None and output.metrics is not None:
                    timings.observe(output.metrics)
                yield to_deltas(output, sampling)
        except EngineDeadError:
            logger.error("engine for %s died; failing request %s", self.spec.model, request_id)
            yield EngineFailure("The model's engine failed and is restarting. Please retry shortly.")
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away (client disconnect): vLLM's generate() aborts on cancellation; make sure.
            if not finished:
                self._aborted_total += 1
                await asyncio.shield(self._llm.abort(request_id))
            raise
        except Exception as exc:  # an engine-side failure must reach the client as a clean error, not a hang
            logger.error("engine for %s failed request %s: %s", self.spec.model, request_id, type(exc).__name__)
            yield EngineFailure("The model's engine could not complete the request.")
        finally:
            self._active.discard(request_id)

    def load(self) -> EngineLoad:
        in_flight = self._llm.output_processor.get_num_unfinished_requests()
        # The scheduler reports only when the engine steps; once nothing is in flight its last figures are stale.
        running = min(self._gauge.running, in_flight)
        return EngineLoad(
            model=self.spec.model,
            ready=not self.dead,
            running=running,
            waiting=min(self._gauge.waiting, in_flight - running),
            in_flight=in_flight,
            kv_cache_usage=self._gauge.kv_cache_usage if in_flight else 0.0,
            aborted_total=self._aborted_total,
            request_ids=tuple(sorted(self._active)),
        )

    def shutdown(self) -> None:
        self._llm.shutdown()


@serve.deployment(name="Engine", health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class Engine:
    """Ray Serve deployment: one engine replica. Options (name, resources, placement) come from the builder."""

    def __init__(self, spec: EngineSpec) -> None:
        tracing.configure(f"anker-engine-{spec.model}")
        self._core = EngineCore(spec)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._reporter = asyncio.get_running_loop().create_task(self._report_load())

    async def _report_load(self) -> None:
        """Queue depth and KV-cache use of this replica, for dashboards (and whatever the autoscaler does)."""
        while True:
            load = self._core.load()
            metrics.engine_load(self._core.spec.model, self._replica, load.running + load.waiting, load.kv_cache_usage)
            await asyncio.sleep(METRICS_PERIOD_S)

    async def generate(
        self,
        request_id: str,
        token_ids: tuple[int, ...],
        sampling: Sampling,
        max_tokens: int,
        trace: tracing.Carrier | None = None,
        block_hashes: tuple[int, ...] = (),
        cache_salt: str | None = None,
    ) -> AsyncIterator[list[Delta] | EngineFailure]:
        """``block_hashes`` are not used here: the prefix-aware request router (deployments/router.py) reads them in
        the caller's process to pick this replica. ``cache_salt`` keeps the prompt in its organisation's own prefix
        cache."""
        timings = EngineTimings()
        with tracing.span(
            "engine.generate",
            trace,
            SpanKind.SERVER,
            {
                "anker.model": self._core.spec.model,
                "anker.request_id": request_id,
                "anker.max_tokens": max_tokens,
                "anker.engine_replica": self._replica,
            },
        ) as current:
            try:
                async for item in self._core.generate(request_id, token_ids, sampling, max_tokens, timings, cache_salt):
                    yield item
            finally:
                for name, start_ns, end_ns in timings.phases_ns():
                    child = tracing.tracer().start_span(name, context=set_span_in_context(current), start_time=start_ns)
                    child.end(end_time=end_ns)

    async def ready(self) -> bool:
        return not self._core.dead

    async def load(self) -> EngineLoad:
        return self._core.load()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for custom autoscaling metrics: this replica's vLLM queue and KV-cache use."""
        load = self._core.load()
        return {QUEUE_METRIC: float(load.running + load.waiting), KV_CACHE_METRIC: float(load.kv_cache_usage)}

    async def record_routing_stats(self) -> dict[str, float]:
        """Serve's hook for request-router stats (``RunningReplica.routing_stats``), and what an operator or a
        test asks one replica's actor for: vLLM's own queue on this replica right now. Counts only."""
        load = self._core.load()
        return {
            "running": float(load.running),
            "waiting": float(load.waiting),
            "in_flight": float(load.in_flight),
            "kv_cache_usage": float(load.kv_cache_usage),
        }

    async def check_health(self) -> None:
        # A dead engine core makes the replica unhealthy, so Ray Serve replaces it.
        if self._core.dead:
            raise RuntimeError(f"vLLM engine for {self._core.spec.model} is dead")

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            core.shutdown()
