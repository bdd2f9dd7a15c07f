"""The benchmark's report: a Markdown page with tables (figures, and ratios to bare vLLM), PNG plots beside it and
the figures as JSON. It writes numbers, settings and error messages; never a prompt or a completion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.bench_stats import Summary, ratio

BASELINE = "vllm"
PERCENTILE_NAMES = ("p50", "p95", "p99")
LATENCIES = (
    ("ttft_ms", "TTFT (ms)"),
    ("itl_ms", "inter-token latency (ms)"),
    ("tpot_ms", "time per output token (ms)"),
)
TARGET_TITLES = {"anker": "Anker", "vllm": "bare vLLM", "ray-serve-llm": "Ray Serve LLM"}
COLOURS = {"anker": "#1f6f8b", "vllm": "#99a3a4", "ray-serve-llm": "#e07a1f"}


@dataclass
class Report:
    """Everything one run found, in the order it was measured."""

    command: str
    machine: dict[str, str]
    setup: dict[str, Any]
    summaries: list[Summary] = field(default_factory=list)
    routing: list[Summary] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # target or policy -> why it did not run
    startup_s: dict[str, float] = field(default_factory=dict)  # target or policy -> seconds until it served
    startup_notes: list[str] = field(default_factory=list)  # start-ups that had to be tried again


def _title(target: str) -> str:
    return TARGET_TITLES.get(target, target)


def _num(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _times(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _share(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:.1f} %"


def _errors(s: Summary) -> str:
    if not s.errors:
        return "0"
    return f"{s.errors} ({', '.join(f'{code}: {n}' for code, n in sorted(s.error_codes.items()))})"


def _workloads(summaries: Sequence[Summary]) -> list[str]:
    return list(dict.fromkeys(s.workload for s in summaries))


def _figures_table(summaries: list[Summary]) -> list[str]:
    rows = [
        "| target | requests | errors | output tok/s | TTFT p50 / p95 / p99 (ms) | ITL p50 / p95 / p99 (ms) "
        "| TPOT p50 / p95 / p99 (ms) | cached share |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        t, i, o = s.ttft_ms, s.itl_ms, s.tpot_ms
        rows.append(
            f"| {_title(s.target)} | {s.requests} | {_errors(s)} | {_num(s.output_tokens_per_s)} "
            f"| {_num(t.p50, 0)} / {_num(t.p95, 0)} / {_num(t.p99, 0)} "
            f"| {_num(i.p50)} / {_num(i.p95)} / {_num(i.p99)} "
            f"| {_num(o.p50)} / {_num(o.p95)} / {_num(o.p99)} | {_share(s.cached_share)} |"
        )
    return rows


def _ratio_table(summaries: list[Summary]) -> list[str]:
    base = next((s for s in summaries if s.target == BASELINE), None)
    if base is None:
        return ["(bare vLLM did not run: no ratios)"]
    metrics = ("ttft_ms", "itl_ms", "tpot_ms")
    header = " | ".join(f"{m[:-3].upper()} {p}" for m in metrics for p in PERCENTILE_NAMES)
    rows = [f"| target | output tok/s | {header} |", "| --- |" + " ---: |" * (1 + 3 * len(metrics))]
    for s in summaries:
        cells = [ratio(s.output_tokens_per_s, base.output_tokens_per_s)]
        for m in metrics:
            cells += [ratio(getattr(getattr(s, m), p), getattr(getattr(base, m), p)) for p in PERCENTILE_NAMES]
        rows.append(f"| {_title(s.target)} | " + " | ".join(_times(c) for c in cells) + " |")
    return rows


def _routing_table(routing: list[Summary], reference: Summary | None) -> list[str]:
    rows = [
        "| router policy | requests | errors | prompt tokens | cached tokens | cached share | TTFT p50 (ms) "
        "| TTFT p95 (ms) | output tok/s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    named = [(f"`{s.target}`", s) for s in routing]
    if reference is not None:
        named.append(("1 engine replica (reference)", reference))
    for name, s in named:
        rows.append(
            f"| {name} | {s.requests} | {_errors(s)} | {s.prompt_tokens:,} | {s.cached_tokens:,} "
            f"| {_share(s.cached_share)} | {_num(s.ttft_ms.p50, 0)} | {_num(s.ttft_ms.p95, 0)} "
            f"| {_num(s.output_tokens_per_s)} |"
        )
    return rows


def _plot_targets(summaries: list[Summary], out: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summaries:
        return []
    workloads = _workloads(summaries)
    targets = list(dict.fromkeys(s.target for s in summaries))
    by_key = {(s.workload, s.target): s for s in summaries}
    width = 0.8 / len(targets)
    files = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, target in enumerate(targets):
        values = [by_key[(w, target)].output_tokens_per_s if (w, target) in by_key else 0.0 for w in workloads]
        xs = [j + (k - (len(targets) - 1) / 2) * width for j in range(len(workloads))]
        ax.bar(xs, values, width, label=_title(target), color=COLOURS.get(target))
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput (higher is better)")
    ax.margins(y=0.25)
    ax.legend(loc="upper right")
    fig.tight_layout()
    files.append(f"{stem}-throughput.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(workloads), len(LATENCIES), figsize=(14, 3.2 * len(workloads)), squeeze=False)
    for row, workload in enumerate(workloads):
        for col, (metric, label) in enumerate(LATENCIES):
            ax = axes[row][col]
            for k, target in enumerate(targets):
                s = by_key.get((workload, target))
                values = [getattr(getattr(s, metric), p) if s else 0.0 for p in PERCENTILE_NAMES]
                values = [0.0 if math.isnan(v) else v for v in values]
                xs = [j + (k - (len(targets) - 1) / 2) * width for j in range(3)]
                ax.bar(xs, values, width, label=_title(target), color=COLOURS.get(target))
            ax.set_xticks(range(3), list(PERCENTILE_NAMES))
            ax.set_title(f"{workload}: {label}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(targets))
    fig.suptitle("Latency (lower is better)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    files.append(f"{stem}-latency.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.6), squeeze=False)
    for col, workload in enumerate(workloads):
        ax = axes[0][col]
        for target in targets:
            s = by_key.get((workload, target))
            if s and s.ttft_samples_ms:
                n = len(s.ttft_samples_ms)
                ax.step(
                    s.ttft_samples_ms,
                    [(i + 1) / n for i in range(n)],
                    where="post",
                    label=_title(target),
                    color=COLOURS.get(target),
                )
        ax.set_xlim(left=0)
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("share of requests")
        ax.set_title(workload)
        ax.legend()
    fig.suptitle("Time to first token, cumulative")
    fig.tight_layout()
    files.append(f"{stem}-ttft-cdf.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)
    return files


def _plot_routing(routing: list[Summary], reference: Summary | None, out: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not routing:
        return []
    policies = [s.target for s in routing]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(policies, [0.0 if math.isnan(s.cached_share) else s.cached_share * 100 for s in routing])
    if reference is not None and not math.isnan(reference.cached_share):
        left.axhline(reference.cached_share * 100, color="black", linestyle="--", label="1 engine replica")
        left.legend(loc="lower right")
    left.set_ylabel("cached prompt tokens (%)")
    left.set_title("Cached-token share (higher is better)")
    width = 0.35
    for k, (p, label) in enumerate((("p50", "TTFT p50"), ("p95", "TTFT p95"))):
        values = [getattr(s.ttft_ms, p) for s in routing]
        xs = [j + (k - 0.5) * width for j in range(len(routing))]
        right.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=label)
    right.set_xticks(range(len(routing)), policies)
    right.set_ylabel("ms")
    right.set_title("Time to first token (lower is better)")
    right.margins(y=0.25)
    right.legend(loc="upper right")
    fig.suptitle("multi_turn on Anker with 2 engine replicas")
    fig.tight_layout()
    name = f"{stem}-routing.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


def _no_nan(value: Any) -> Any:
    """NaN (a percentile of no values) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _setup_lines(setup: dict[str, Any]) -> list[str]:
    return [f"- {key}: {value}" for key, value in setup.items()]


def write(report: Report, out: Path, name: str) -> Path:
    """Writes ``<out>/<name>.md``, ``<name>.json`` and ``<name>-*.png``; returns the Markdown file."""
    out.mkdir(parents=True, exist_ok=True)
    reference = next((s for s in report.summaries if s.target == "anker" and s.workload == "multi_turn"), None)
    target_plots = _plot_targets(report.summaries, out, name)
    routing_plots = _plot_routing(report.routing, reference, out, name)
    lines = [
        "# Side-by-side benchmark: Anker, bare vLLM, Ray Serve LLM",
        "",
        "Produced in one run by:",
        "",
        "```bash",
        report.command,
        "```",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in report.machine.items()],
        "",
        "## Setup",
        "",
        *_setup_lines(report.setup),
        "",
    ]
    for workload in _workloads(report.summaries):
        rows = [s for s in report.summaries if s.workload == workload]
        lines += [
            f"## Workload `{workload}`",
            "",
            *_figures_table(rows),
            "",
            "Ratio to bare vLLM (throughput: higher is better; latencies: lower is better):",
            "",
            *_ratio_table(rows),
            "",
        ]
    if target_plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in target_plots], ""]
    if report.routing or any(k.startswith("routing") for k in report.failures):
        lines += [
            "## Routing: `prefix_aware` vs `power_of_two`",
            "",
            "The `multi_turn` workload (conversations whose every turn resends the whole history) against Anker with "
            "2 engine replicas of the model, once per router policy. Cached share = cached prompt tokens / prompt "
            "tokens, from each response's `usage.prompt_tokens_details.cached_tokens`.",
            "",
            *_routing_table(report.routing, reference),
            "",
            *(
                [
                    "The reference row is the side-by-side run's `multi_turn` on Anker with one engine replica, "
                    "where every turn finds its conversation's prefix: the cached share a router can at best reach "
                    "(its latencies come from a stack with one engine, not from the routing runs' two).",
                    "",
                ]
                if reference is not None
                else []
            ),
            *[f"![{p}]({p})" for p in routing_plots],
            "",
        ]
    if report.startup_s:
        lines += [
            "## Start-up",
            "",
            "Seconds from launch until the server answered a chat completion (and, for Anker, every engine replica "
            "ran):",
            "",
            "| server | seconds |",
            "| --- | ---: |",
            *[f"| {_title(what)} | {seconds:.0f} |" for what, seconds in report.startup_s.items()],
            "",
            *[f"- {note}" for note in report.startup_notes],
            *([""] if report.startup_notes else []),
        ]
    if report.failures:
        lines += ["## What did not run", ""]
        lines += [f"- **{_title(what)}**: {why}" for what, why in report.failures.items()]
        lines.append("")
    md = out / f"{name}.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    data = {
        "command": report.command,
        "machine": report.machine,
        "setup": report.setup,
        "summaries": [s.to_json() for s in report.summaries],
        "routing": [s.to_json() for s in report.routing],
        "startup_s": report.startup_s,
        "startup_notes": report.startup_notes,
        "failures": report.failures,
    }
    text = json.dumps(_no_nan(data), indent=2, default=str, allow_nan=False)
    (out / f"{name}.json").write_text(text + "\n", encoding="utf-8")
    return md
