"""The benchmark's report: a Markdown page with tables (figures, and ratios to bare vLLM), PNG plots beside it and
the figures as JSON. It writes numbers, settings and error messages; never a prompt or a completion.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
TARGET_TITLES = {
    "anker": "Anker",
    "vllm": "bare vLLM",
    "ray-serve-llm": "Ray Serve LLM",
    "ray-serve-llm-direct": "Ray Serve LLM, direct",
}
COLOURS = {
    "anker": "#1f6f8b",
    "vllm": "#99a3a4",
    "ray-serve-llm": "#e07a1f",
    "ray-serve-llm-direct": "#f4a261",
}
# Issue 14's goals for Anker against bare vLLM, by the figure's name in ``_round_figures``.
GOALS = {
    "tok/s ratio": (">=", 0.97),
    "TTFT p50 added (ms)": ("<=", 5.0),
    "CPU ms added per output token": ("<=", 0.1),
    "CPU ms added per request": ("<=", 5.0),
}


@dataclass(frozen=True)
class Round:
    """One target under one workload in one round, with the CPU its processes and the load client spent."""

    number: int
    target: str
    workload: str
    requests: int
    errors: int
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    cpu_ms: dict[str, float]
    client_cpu_ms: float
    wall_s: float = 0.0
    idle_cpu_ms: float = 0.0  # what the target's processes spend in as long at rest (Report.idle_ms_per_s)

    @classmethod
    def of(
        cls, number: int, s: Summary, cpu_ms: dict[str, float], client_cpu_ms: float, idle_ms_per_s: float = 0.0
    ) -> Round:
        return cls(
            number,
            s.target,
            s.workload,
            s.requests,
            s.errors,
            s.output_tokens,
            s.output_tokens_per_s,
            s.ttft_ms.p50,
            dict(cpu_ms),
            client_cpu_ms,
            s.wall_s,
            idle_ms_per_s * s.wall_s,
        )

    @property
    def busy_cpu_ms(self) -> float:
        """The CPU the work took: all of it less what the target spends at rest in as long."""
        return self.cpu_total_ms - self.idle_cpu_ms

    @property
    def cpu_total_ms(self) -> float:
        return sum(self.cpu_ms.values())


@dataclass
class Report:
    """Everything one run found, in the order it was measured."""

    command: str
    machine: dict[str, str]
    setup: dict[str, Any]
    summaries: list[Summary] = field(default_factory=list)
    routing: list[Summary] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    idle_ms_per_s: dict[str, dict[str, float]] = field(default_factory=dict)  # target -> group -> CPU ms/s at rest
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


def _median(values: Sequence[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def write_or_print(text: str, path: Path | None) -> None:
    """A benchmark's Markdown report: into ``path`` if given, else to standard output."""
    if path is not None:
        path.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _spread(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """The median and, in brackets, the smallest and largest of one figure over the rounds."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return "n/a"
    return f"{_median(kept):,.{digits}f}{unit} [{min(kept):,.{digits}f}, {max(kept):,.{digits}f}]"


def _per(value: float, count: int) -> float:
    return value / count if count else math.nan


def _round_figures(rounds: Sequence[Round], workload: str, target: str) -> dict[str, list[float]]:
    """Each round's figures of ``target`` under ``workload``, each against bare vLLM in the same round."""
    by_key = {(r.number, r.target): r for r in rounds if r.workload == workload}
    figures: dict[str, list[float]] = {}
    for (number, name), r in sorted(by_key.items()):
        base = by_key.get((number, BASELINE))
        if name != target or base is None:
            continue
        row = {
            "tok/s ratio": ratio(r.output_tokens_per_s, base.output_tokens_per_s),
            "TTFT p50 added (ms)": r.ttft_p50_ms - base.ttft_p50_ms,
            "CPU ms per request": _per(r.cpu_total_ms, r.requests),
            "CPU ms per output token": _per(r.cpu_total_ms, r.output_tokens),
            "CPU ms added per request": _per(r.busy_cpu_ms, r.requests) - _per(base.busy_cpu_ms, base.requests),
            "CPU ms added per output token": _per(r.busy_cpu_ms, r.output_tokens)
            - _per(base.busy_cpu_ms, base.output_tokens),
        }
        for key, value in row.items():
            figures.setdefault(key, []).append(value)
    return figures


ROUND_COLUMNS = (
    ("tok/s ratio", 2, "x"),
    ("TTFT p50 added (ms)", 0, ""),
    ("CPU ms per request", 1, ""),
    ("CPU ms per output token", 2, ""),
    ("CPU ms added per request", 1, ""),
    ("CPU ms added per output token", 2, ""),
)


def _rounds_table(rounds: Sequence[Round], workload: str) -> list[str]:
    targets = list(dict.fromkeys(r.target for r in rounds))
    header = " | ".join(name for name, _, _ in ROUND_COLUMNS)
    lines = [f"| target | {header} |", "| --- |" + " ---: |" * len(ROUND_COLUMNS)]
    for target in targets:
        figures = _round_figures(rounds, workload, target)
        cells = [_spread(figures.get(name, []), digits, unit) for name, digits, unit in ROUND_COLUMNS]
        lines.append(f"| {_title(target)} | " + " | ".join(cells) + " |")
    return lines


def _cpu_by_group(rounds: Sequence[Round]) -> list[str]:
    """CPU ms per output token by process group: each round's sum over its workloads, the median over rounds."""
    lines = ["| target | process | CPU ms per output token | CPU ms per request |", "| --- | --- | ---: | ---: |"]
    for target in dict.fromkeys(r.target for r in rounds):
        mine = [r for r in rounds if r.target == target]
        numbers = sorted({r.number for r in mine})
        groups = sorted({g for r in mine for g in r.cpu_ms} | {"load client"})
        for group in groups:
            per_token, per_request = [], []
            for number in numbers:
                these = [r for r in mine if r.number == number]
                spent = sum(r.client_cpu_ms if group == "load client" else r.cpu_ms.get(group, 0.0) for r in these)
                per_token.append(_per(spent, sum(r.output_tokens for r in these)))
                per_request.append(_per(spent, sum(r.requests for r in these)))
            token_ms, request_ms = _num(_median(per_token), 3), _num(_median(per_request), 2)
            lines.append(f"| {_title(target)} | {group} | {token_ms} | {request_ms} |")
    return lines


def _idle_table(idle: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| target | process | CPU ms per second |", "| --- | --- | ---: |"]
    for target, groups in idle.items():
        for group, rate in sorted(groups.items()):
            lines.append(f"| {_title(target)} | {group} | {rate:,.1f} |")
        lines.append(f"| {_title(target)} | **all** | **{sum(groups.values()):,.1f}** |")
    return lines


def _goals_table(rounds: Sequence[Round], workloads: Sequence[str]) -> list[str]:
    anker = ["anker"] if any(r.target == "anker" for r in rounds) else []
    lines = [
        "| figure | workload | goal | " + " | ".join(_title(t) for t in anker) + " |",
        "| --- | --- | --- |" + " ---: |" * len(anker),
    ]
    for name, (sense, goal) in GOALS.items():
        for workload in workloads:
            if name == "TTFT p50 added (ms)" and workload != "short_chat":
                continue
            cells = []
            for target in anker:
                value = _median(_round_figures(rounds, workload, target).get(name, []))
                met = not math.isnan(value) and (value >= goal if sense == ">=" else value <= goal)
                cells.append(f"{_num(value, 2)} {'(met)' if met else '(not met)'}")
            lines.append(f"| {name} | `{workload}` | {sense} {goal:g} | " + " | ".join(cells) + " |")
    return lines


def _setup_lines(setup: dict[str, Any]) -> list[str]:
    return [f"- {key}: {value}" for key, value in setup.items()]


def write(report: Report, out: Path, name: str) -> Path:
    """Writes ``<out>/<name>.md``, ``<name>.json`` and ``<name>-*.png``; returns the Markdown file."""
    out.mkdir(parents=True, exist_ok=True)
    reference = next((s for s in report.summaries if s.target == "anker" and s.workload == "multi_turn"), None)
    target_plots = _plot_targets(report.summaries, out, name)
    routing_plots = _plot_routing(report.routing, reference, out, name)
    targets = list(dict.fromkeys(s.target for s in report.summaries)) or list(TARGET_TITLES)
    lines = [
        "# Side-by-side benchmark: " + ", ".join(_title(t) for t in targets),
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
    if report.rounds:
        workloads = list(dict.fromkeys(r.workload for r in report.rounds))
        lines += [
            "## Side by side, round by round",
            "",
            "Each figure is taken per round against bare vLLM in the same round: the median over the rounds and, in "
            "brackets, the smallest and the largest. CPU is the user + system time of every process of the target "
            "(its whole process tree: Ray's, Serve's replicas, vLLM's engine core and worker, HAProxy) while it ran "
            "the workload, from the kernel; the load client's own is apart, below. *Added* CPU is the work's: each "
            "target's CPU less what it spends at rest in as long (measured before the rounds, below), less bare "
            "vLLM's the same way.",
            "",
        ]
        for workload in workloads:
            lines += [f"### `{workload}`", "", *_rounds_table(report.rounds, workload), ""]
        lines += [
            "### Against the goals",
            "",
            "Medians over the rounds, as in the tables above.",
            "",
            *_goals_table(report.rounds, workloads),
            "",
            "### CPU by process",
            "",
            "Each round's CPU over all its workloads, per output token and per request; the median over rounds.",
            "",
            *_cpu_by_group(report.rounds),
            "",
            "### CPU at rest",
            "",
            "CPU milliseconds per second that each target's processes spent with no request, before the rounds "
            "(a whole core is 1,000).",
            "",
            *_idle_table(report.idle_ms_per_s),
            "",
            "## All rounds pooled",
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
        "rounds": [asdict(r) for r in report.rounds],
        "idle_ms_per_s": report.idle_ms_per_s,
        "startup_s": report.startup_s,
        "startup_notes": report.startup_notes,
        "failures": report.failures,
    }
    text = json.dumps(_no_nan(data), indent=2, default=str, allow_nan=False)
    (out / f"{name}.json").write_text(text + "\n", encoding="utf-8")
    return md
