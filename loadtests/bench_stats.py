"""The benchmark's figures for one measured run: output tokens/s, TTFT, inter-token latency and time-per-output-token
percentiles, cached share, errors; and their ratios to a baseline. Numbers only: no request or response text.

ITL is every gap between two chunks that carry output, as the client sees them: a server that sends tokens in bursts
(several events in one read) shows many gaps near 0 and a few long ones. TPOT is per request, (end - first token) /
(output tokens - 1), the steady decode pace whatever the chunking.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.bench_client import Measured

PERCENTILES = (50, 95, 99)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float

    @classmethod
    def of_ms(cls, values_s: list[float]) -> Percentiles:
        p50, p95, p99 = (percentile(values_s, q) * 1000 for q in PERCENTILES)
        return cls(p50, p95, p99)


@dataclass(frozen=True)
class Summary:
    """One target under one workload."""

    target: str
    workload: str
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: Percentiles
    itl_ms: Percentiles
    tpot_ms: Percentiles
    prompt_tokens: int
    cached_tokens: int
    error_codes: dict[str, int] = field(default_factory=dict)
    ttft_samples_ms: list[float] = field(default_factory=list, repr=False)  # for the CDF plot

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else math.nan

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cached_share"] = self.cached_share
        return data


def summarize(target: str, workload: str, measured: Measured) -> Summary:
    ok = [r for r in measured.results if r.error is None]
    failed = [r for r in measured.results if r.error is not None]
    output_tokens = sum(r.output_tokens for r in ok)
    ttft_s = [r.ttft_s for r in ok if r.ttft_s is not None]
    return Summary(
        target=target,
        workload=workload,
        requests=len(measured.results),
        errors=len(failed),
        wall_s=measured.wall_s,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / measured.wall_s if measured.wall_s > 0 else 0.0,
        ttft_ms=Percentiles.of_ms(ttft_s),
        itl_ms=Percentiles.of_ms([gap for r in ok for gap in r.itl_s]),
        tpot_ms=Percentiles.of_ms(
            [(r.total_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.ttft_s is not None and r.output_tokens > 1]
        ),
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        cached_tokens=sum(r.cached_tokens for r in ok),
        error_codes=dict(Counter(str(r.error) for r in failed)),
        ttft_samples_ms=sorted(t * 1000 for t in ttft_s),
    )


def ratio(value: float, baseline: float) -> float:
    """value / baseline, NaN when either is missing or the baseline is 0."""
    if math.isnan(value) or math.isnan(baseline) or baseline == 0:
        return math.nan
    return value / baseline
