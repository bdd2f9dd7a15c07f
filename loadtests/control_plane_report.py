"""The control-plane benchmark's results and their Markdown report: tables of one run, CPU per request by process,
the ledger checks, and the headroom arithmetic (cost per request and per streamed output, against the engine's).

It only holds and formats what ``loadtests.control_plane`` measured; it measures nothing itself.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psutil

from loadtests.billing_load import BillingRun
from loadtests.http_load import LoadRun
from loadtests.native_load import Profile, WrkRun
from loadtests.process_cpu import CLIENT, HAPROXY, OTHER, POSTGRES, PROXY, CpuUse

# The engine replica (its door, vLLM's serving layer, the engine client and the engine core it started), the
# control application (models, usage; no generation passes it) and the billing actor, by their deployment names.
SERVING = "Engine"
PARTS = [CLIENT, HAPROXY, PROXY, SERVING, "Control", "Billing", OTHER]
WRK_PART = "wrk"
NATIVE_PARTS = [WRK_PART, HAPROXY, SERVING, "Billing", OTHER]


@dataclass
class LedgerCheck:
    """The ledger against what the client saw: one ``ok`` row per successful request, tokens summing up."""

    successes: int
    ok_rows: int = -1
    other_rows: int = -1
    tokens_match: bool = False
    cached_tokens: int = 0  # in the ok rows: the engine reported them and billing kept them

    @property
    def passed(self) -> bool:
        return self.successes > 0 and self.ok_rows == self.successes and self.tokens_match


@dataclass
class NativeLedgerCheck:
    """The ledger against wrk's counts (it reads no answer): every success billed, none twice, each the double's
    exact length. At most one more ``ok`` row per connection: a request finished while wrk closed it at the end."""

    successes: int
    connections: int
    ok_rows: int = -1
    other_rows: int = -1
    lengths_match: bool = False

    @property
    def passed(self) -> bool:
        return (
            self.successes > 0
            and self.successes <= self.ok_rows <= self.successes + self.connections
            and 0 <= self.other_rows <= self.connections
            and self.lengths_match
        )


@dataclass(frozen=True)
class NativeRow:
    """One wrk run against the engine replica on the engine double."""

    run: WrkRun
    tokens_per_delta: int  # of the engine double
    cpu: CpuUse
    ledger: NativeLedgerCheck

    @property
    def label(self) -> str:
        return "stream" if self.run.stream else "JSON"

    def cpu_ms_per_request(self, part: str) -> float:
        seconds = self.run.cpu_s if part == WRK_PART else self.cpu.seconds_by_part.get(part, 0.0)
        return seconds * 1000 / self.run.successes if self.run.successes else float("nan")

    @property
    def engine_busy_share(self) -> float:
        """Of one core, what the engine replica used over the run."""
        return self.cpu.seconds_by_part.get(SERVING, 0.0) / self.run.seconds if self.run.seconds else 0.0


@dataclass(frozen=True)
class IngressRow:
    run: LoadRun
    tokens_per_delta: int | None  # of the engine double; None: the real vLLM engine
    cpu: CpuUse
    ledger: LedgerCheck

    @property
    def engine(self) -> str:
        if self.tokens_per_delta is None:
            return "vLLM, tiny model"
        return f"double, {self.tokens_per_delta} token{'s' if self.tokens_per_delta > 1 else ''}/output"

    @property
    def done(self) -> int:
        """Successful requests that ended inside the measured window."""
        return sum(1 for a in self.run.measured if a.error is None)

    def cpu_ms_per_request(self, part: str) -> float:
        return self.cpu.seconds_by_part.get(part, 0.0) * 1000 / self.done if self.done else float("nan")

    @property
    def label(self) -> str:
        return "stream" if self.run.stream else "JSON"


@dataclass(frozen=True)
class BillingRow:
    run: BillingRun
    cpu: CpuUse
    round: int = 0  # which round of the billing rows (``--billing-rounds``)

    def cpu_ms_per_event(self, part: str) -> float:
        return self.cpu.seconds_by_part.get(part, 0.0) * 1000 / self.run.acked if self.run.acked else float("nan")


def median_rounds(rows: list[BillingRow]) -> list[tuple[BillingRow, list[BillingRow]]]:
    """Each billing setting (database, senders, batch) once, in the order first run: its round of median events/s
    (the lower middle one of an even count), with all its rounds in the order run."""
    settings: dict[tuple[str, int, int], list[BillingRow]] = {}
    for row in rows:
        settings.setdefault((row.run.database, row.run.senders, row.run.batch_size), []).append(row)
    chosen = []
    for rounds in settings.values():
        ordered = sorted(rounds, key=lambda r: r.run.events_per_s)
        chosen.append((ordered[(len(ordered) - 1) // 2], rounds))
    return chosen


def machine() -> dict[str, Any]:
    import ray

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "ray": ray.__version__,
    }


@dataclass
class Results:
    command: str
    started: datetime
    seconds: float
    args: dict[str, Any]
    ingress: list[IngressRow]
    billing: list[BillingRow]
    machine_start: dict[str, Any]  # machine() when the run started
    native: list[NativeRow] = field(default_factory=list)
    profile: Profile | None = None

    @property
    def all_checks_passed(self) -> bool:
        return (
            all(r.ledger.passed for r in self.ingress)
            and all(r.ledger.passed and r.run.socket_errors == 0 for r in self.native)
            and all(r.run.recorded_once for r in self.billing)
        )

    def summary(self) -> dict[str, Any]:
        """The figures as plain data (for the smoke test and for comparing runs)."""
        return {
            "command": self.command,
            "started": self.started.isoformat(),
            "seconds": round(self.seconds, 1),
            "machine": self.machine_start,
            "all_checks_passed": self.all_checks_passed,
            "ingress": [
                {
                    "stream": r.run.stream,
                    "concurrency": r.run.concurrency,
                    "output_tokens": r.run.output_tokens,
                    "engine": r.engine,
                    "tokens_per_delta": r.tokens_per_delta,
                    "output_tokens_per_s": r.run.output_tokens_per_s(),
                    "requests": len(r.run.answers),
                    "successes": len(r.run.ok),
                    "requests_per_s": r.run.requests_per_s(),
                    "p50_ms": r.run.latency_ms(0.50),
                    "p95_ms": r.run.latency_ms(0.95),
                    "p99_ms": r.run.latency_ms(0.99),
                    "errors": dict(r.run.errors),
                    "cpu_s": r.cpu.seconds_by_part,
                    "outside_cpu_s": r.cpu.outside_s,
                    "machine_busy_share": r.cpu.machine_busy_share,
                    "ledger_ok_rows": r.ledger.ok_rows,
                    "ledger_other_rows": r.ledger.other_rows,
                    "ledger_tokens_match": r.ledger.tokens_match,
                    "ledger_cached_tokens": r.ledger.cached_tokens,
                    "ledger_passed": r.ledger.passed,
                }
                for r in self.ingress
            ],
            "native": [
                {
                    "stream": r.run.stream,
                    "connections": r.run.connections,
                    "requests": r.run.requests,
                    "successes": r.run.successes,
                    "not_2xx": r.run.not_2xx,
                    "socket_errors": r.run.socket_errors,
                    "requests_per_s": r.run.requests_per_s,
                    "latency_ms": r.run.latency_ms,
                    "wrk_cpu_s": r.run.cpu_s,
                    "cpu_s": r.cpu.seconds_by_part,
                    "machine_busy_share": r.cpu.machine_busy_share,
                    "ledger_ok_rows": r.ledger.ok_rows,
                    "ledger_other_rows": r.ledger.other_rows,
                    "ledger_passed": r.ledger.passed,
                }
                for r in self.native
            ],
            "profile": (
                {
                    "seconds": self.profile.seconds,
                    "samples": self.profile.samples,
                    "gil_share": self.profile.gil_share,
                    "by_owner": dict(self.profile.by_owner),
                }
                if self.profile is not None
                else None
            ),
            "billing": [
                {
                    "database": r.run.database,
                    "batch_size": r.run.batch_size,
                    "senders": r.run.senders,
                    "events": r.run.acked,
                    "events_per_s": r.run.events_per_s,
                    "call_p50_ms": r.run.call_ms_median(),
                    "ledger_events": r.run.ledger_events,
                    "replay_added": r.run.replay_added,
                    "recorded_once": r.run.recorded_once,
                    "round": r.round,
                    "cpu_s": r.cpu.seconds_by_part,
                }
                for r in self.billing
            ],
        }


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _ledger_cell(ledger: LedgerCheck | NativeLedgerCheck) -> str:
    """A row's ledger check: its verdict, ``ok`` rows against successes, and the rows of other statuses."""
    verdict = "✅" if ledger.passed else "❌"
    extra = f" (+{ledger.other_rows} not ok)" if ledger.other_rows else ""
    return f"{verdict} {ledger.ok_rows} / {ledger.successes}{extra}"


def _cpu_table_head(columns: list[str], parts: list[str]) -> list[str]:
    """The header of a table of CPU per request: ``columns`` that name the row, then one right-aligned per part."""
    return [
        "| " + " | ".join([*columns, *parts]) + " |",
        "| --- | " + " | ".join(["---:"] * (len(columns) - 1 + len(parts))) + " |",
    ]


def _ingress_tables(results: Results) -> list[str]:
    lines = [
        "| engine | mode | clients | req/s | output tokens/s | p50 ms | p95 ms | p99 ms | errors | "
        "ledger: ok rows / successes | machine busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results.ingress:
        run = r.run
        rps = run.requests_per_s()
        errors = ", ".join(f"{n} {kind}" for kind, n in run.errors.items()) or "0"
        lines.append(
            f"| {r.engine} | {r.label} | {run.concurrency} | {_fmt(rps)} | "
            f"{_fmt(run.output_tokens_per_s(), 0)} | {_fmt(run.latency_ms(0.5))} | {_fmt(run.latency_ms(0.95))} | "
            f"{_fmt(run.latency_ms(0.99))} | {errors} | {_ledger_cell(r.ledger)} | "
            f"{r.cpu.machine_busy_share:.0%} |"
        )
    lines += [
        "",
        "CPU milliseconds per successful request, by process, over the measured window. *Engine* is the engine "
        "replica: its door (key, admission from the key's leases, metering), vLLM's serving layer (chat template, "
        "tokenizer, parsers, response and SSE encoding) and, on the double, an idle engine core; with real vLLM it "
        "includes generation. "
        "*HTTP proxy* is Serve's proxy actor, which runs HAProxy beside it; *load client* is this benchmark's httpx "
        "client; *outside* is what other work on the shared machine used meanwhile, per request of ours.",
        "",
        *_cpu_table_head(["engine", "mode", "clients"], [*PARTS, "outside"]),
    ]
    for r in results.ingress:
        cells = [_fmt(r.cpu_ms_per_request(part), 2) for part in PARTS]
        outside = r.cpu.outside_s * 1000 / r.done if r.done else float("nan")
        lines.append(
            f"| {r.engine} | {r.label} | {r.run.concurrency} | " + " | ".join(cells) + f" | {_fmt(outside, 2)} |"
        )
    return lines


def _native_tables(results: Results) -> list[str]:
    if not results.native:
        return []
    lines = [
        "## The engine replica under a native load client",
        "",
        f"The first stack above (its engine double giving {results.native[0].tokens_per_delta} token(s) an output), "
        "driven after its rows by `wrk` (C, one thread; `make system-deps` "
        "installs it) on N kept-alive connections instead of the httpx clients, which spend about a millisecond "
        "of CPU a request on the same two cores. wrk reads no answer: the ledger is checked against its counts "
        "(every answer it got with 200 billed, none twice: at most one more `ok` row per connection, for a request "
        "finished while wrk closed it at the end; each `ok` row the double's exact length). "
        "*Engine busy* is the engine replica's CPU over the run, in cores: at 100 % its one Python process is the "
        "limit.",
        "",
        "| mode | connections | req/s | p50 ms | p90 ms | p99 ms | non-2xx | ledger: ok rows / successes "
        "| engine busy | machine busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results.native:
        run = r.run
        latency = [_fmt(run.latency_ms.get(q, math.nan)) for q in ("50%", "90%", "99%")]
        lines.append(
            f"| {r.label} | {run.connections} | {_fmt(run.requests_per_s)} | " + " | ".join(latency) + " | "
            f"{run.not_2xx + run.socket_errors} | {_ledger_cell(r.ledger)} | "
            f"{r.engine_busy_share:.0%} | {r.cpu.machine_busy_share:.0%} |"
        )
    lines += [
        "",
        "CPU milliseconds per successful request, by process (*wrk*: the load client's own).",
        "",
        *_cpu_table_head(["mode", "connections"], NATIVE_PARTS),
    ]
    for r in results.native:
        cells = [_fmt(r.cpu_ms_per_request(part), 2) for part in NATIVE_PARTS]
        lines.append(f"| {r.label} | {r.run.connections} | " + " | ".join(cells) + " |")
    return [*lines, "", *_profile_lines(results)]


def _profile_lines(results: Results) -> list[str]:
    profile = results.profile
    if profile is None or profile.samples == 0:
        return []
    json_rows = [r for r in results.native if not r.run.stream]
    per_request_ms = (
        profile.gil_share * 1000 / json_rows[0].run.requests_per_s
        if json_rows and json_rows[0].run.requests_per_s
        else math.nan
    )
    lines = [
        "### Where the engine replica's Python time goes",
        "",
        f"py-spy sampled the engine replica {profile.rate_hz} times a second for {profile.seconds:g} s under wrk "
        f"(JSON, {results.native[0].run.connections} connections), counting only samples in which a thread held "
        f"the GIL: it was held {profile.gil_share:.0%} of the time, about {_fmt(per_request_ms, 2)} ms a request at "
        "the JSON row's rate above. Each sample counts for the package whose code is innermost on its stack "
        "(library code below it, such as asyncio, pydantic or json, counts for the caller). What the GIL does not "
        "cover (Ray's gRPC and core-worker threads, the tokenizer's Rust code) is the rest of the replica's CPU.",
        "",
        "| code | share of GIL time |",
        "| --- | ---: |",
    ]
    for owner, count in profile.by_owner.most_common():
        lines.append(f"| {owner} | {count / profile.samples:.1%} |")
    lines += ["", "The functions with the most GIL time, each where it is innermost:", ""]
    lines += ["| code | function | share |", "| --- | --- | ---: |"]
    for (owner, function), count in profile.by_function.most_common(15):
        lines.append(f"| {owner} | `{function}` | {count / profile.samples:.1%} |")
    return [*lines, ""]


def _billing_table(results: Results) -> list[str]:
    lines = [
        "| database | senders | batch | calls | events/s | events/s, each round | record() p50 ms | "
        "ledger rows / acked | replay added | billing actor CPU ms per event | database server CPU ms per event | "
        "machine busy |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r, rounds in median_rounds(results.billing):
        run = r.run
        verdict = "✅" if all(b.run.recorded_once for b in rounds) else "❌"
        server = _fmt(r.cpu_ms_per_event(POSTGRES), 2) if run.database == "PostgreSQL" else "-"
        each = ", ".join(_fmt(b.run.events_per_s, 0) for b in rounds)
        lines.append(
            f"| {run.database} | {run.senders} | {run.batch_size} | {len(run.call_ms)} | {_fmt(run.events_per_s, 0)} "
            f"| {each} | {_fmt(run.call_ms_median())} | {verdict} {run.ledger_events} / {run.acked} | "
            f"{run.replay_added} | {_fmt(r.cpu_ms_per_event('Billing'), 2)} | {server} | "
            f"{r.cpu.machine_busy_share:.0%} |"
        )
    return lines


def _per_core(cpu_ms: float) -> str:
    """What one fully used core carries at ``cpu_ms`` of CPU each."""
    return f"~{1000 / cpu_ms:,.0f}" if cpu_ms > 0 and not math.isnan(cpu_ms) else "-"


def _best(rows: list[IngressRow], stream: bool, tokens_per_delta: int | None) -> IngressRow | None:
    chosen = [r for r in rows if r.run.stream == stream and r.tokens_per_delta == tokens_per_delta]
    return max(chosen, key=lambda r: r.run.requests_per_s()) if chosen else None


def _split(rows: list[IngressRow], stream: bool, part: str) -> tuple[float, float, int, int] | None:
    """(CPU ms per request, CPU ms per streamed item, the two item sizes) of ``part``, from the rows of the smallest
    and the largest item size at the same client count."""
    sizes = sorted({r.tokens_per_delta for r in rows if r.tokens_per_delta is not None})
    if len(sizes) < 2:
        return None
    large = next((r for r in rows if r.run.stream == stream and r.tokens_per_delta == sizes[-1]), None)
    if large is None:
        return None
    small = next(
        (
            r
            for r in rows
            if r.run.stream == stream and r.tokens_per_delta == sizes[0] and r.run.concurrency == large.run.concurrency
        ),
        None,
    )
    tokens = large.run.output_tokens
    items_small, items_large = math.ceil(tokens / sizes[0]), math.ceil(tokens / sizes[-1])
    if small is None or items_small == items_large:
        return None
    per_item = (small.cpu_ms_per_request(part) - large.cpu_ms_per_request(part)) / (items_small - items_large)
    return large.cpu_ms_per_request(part) - items_large * per_item, per_item, sizes[0], sizes[-1]


def _mean_tokens(row: IngressRow) -> float:
    done = [a.completion_tokens for a in row.run.measured if a.error is None]
    return sum(done) / len(done) if done else 0.0


def _headroom(results: Results) -> list[str]:
    lines: list[str] = []
    args = results.args
    first = min((r.tokens_per_delta for r in results.ingress if r.tokens_per_delta is not None), default=1)
    for stream in (False, True):
        best = _best(results.ingress, stream, first)
        if best is None:
            continue
        rps = best.run.requests_per_s()
        lines.append(
            f"- **{'Streaming' if stream else 'Non-streaming'}**, {first} token per output: one engine replica served "
            f"**{rps:,.0f} req/s** ({best.run.output_tokens_per_s():,.0f} output tokens/s) at {best.run.concurrency} "
            "clients, the "
            f"machine {best.cpu.machine_busy_share:.0%} busy. CPU per request: the engine replica's serving path "
            f"{_fmt(best.cpu_ms_per_request(SERVING), 2)} ms, HAProxy {_fmt(best.cpu_ms_per_request(HAPROXY), 2)} "
            f"ms, billing actor (key checks, leases, usage record) {_fmt(best.cpu_ms_per_request('Billing'), 2)} "
            f"ms, so one core carries {_per_core(best.cpu_ms_per_request(SERVING))} req/s through a replica's serving "
            f"path, {_per_core(best.cpu_ms_per_request(HAPROXY))} through HAProxy and "
            f"{_per_core(best.cpu_ms_per_request('Billing'))} through the billing actor."
        )
        # A non-streamed answer is one engine output (vLLM asks for the final one only): nothing to split.
        for part in (SERVING, HAPROXY) if stream else ():
            split = _split(results.ingress, stream, part)
            if split is None:
                continue
            fixed, per_item, small, large = split
            if per_item <= 0:
                lines.append(f"  - {part}: no cost per streamed output measurable above the noise.")
                continue
            lines.append(
                f"  - {part}: about {fixed:.2f} ms per request plus {per_item:.2f} ms per engine output streamed "
                f"(rows with {small} and {large} tokens per output, same clients), so one core passes at most "
                f"{_per_core(per_item)} outputs/s: tokens/s, when the engine gives one token per step."
            )
    best_events: dict[str, float] = {}
    for b, _ in median_rounds(results.billing):  # each setting's median round
        best_events[b.run.database] = max(best_events.get(b.run.database, 0.0), b.run.events_per_s)
    json_best = _best(results.ingress, False, first)
    for database, events in best_events.items():
        ratio = f", {events / json_best.run.requests_per_s():,.0f}x the replica's best req/s" if json_best else ""
        record_ms = min(b.cpu_ms_per_event("Billing") for b in results.billing if b.run.database == database)
        admission = ""
        if json_best is not None and database == "SQLite":
            request_ms = json_best.cpu_ms_per_request("Billing")
            admission = (
                f" Its CPU per event, {record_ms:.3f} ms at best, against the {request_ms:.3f} ms the actor spent per "
                "request above (key checks, the keys' leases, the usage record and what the actor does at rest, over "
                "the requests)."
            )
        lines.append(
            f"- **Billing on {database}**: `record` took up to **{events:,.0f} usage events/s** (one event per "
            f"request){ratio}; {_per_core(record_ms)} events/s per core at its best CPU per event.{admission}"
        )
    real = _best(results.ingress, True, None)
    stream_best = _best(results.ingress, True, first)
    if real is not None and stream_best is not None:
        engine_tps, ingress_tps = real.run.output_tokens_per_s(), stream_best.run.output_tokens_per_s()
        serving = stream_best.cpu_ms_per_request(SERVING) / max(1.0, _mean_tokens(stream_best))
        lines.append(
            f"- **Engine**: the real vLLM engine (tiny model, one CPU replica) streamed **{engine_tps:,.0f} output "
            f"tokens/s** ({real.run.requests_per_s():,.1f} req/s) at {real.run.concurrency} clients through the same "
            f"path; with the instant double the replica passed {ingress_tps:,.0f} tokens/s, "
            f"**{ingress_tps / engine_tps:,.1f}x** what the engine produced. The replica used "
            f"{_fmt(real.cpu_ms_per_request(SERVING) / max(1.0, _mean_tokens(real)), 2)} ms of CPU per output token "
            f"with generation, {_fmt(serving, 2)} ms without (its serving path's whole cost per request on the double, "
            "spread over the answer's tokens)."
            if engine_tps > 0
            else "- **Engine**: the real vLLM engine produced no tokens in its window."
        )
    costs = [stream_best.cpu_ms_per_request(part) for part in (SERVING, "Billing")] if stream_best else []
    if real is not None and real.run.requests_per_s() > 0 and costs and all(c > 0 for c in costs):
        engine_rps = real.run.requests_per_s()
        ingress_cap, billing_cap = (1000 / c for c in costs)
        lines.append(
            f"- **Verdict**: per core, an engine replica's serving path carries ~{ingress_cap:,.0f} streamed req/s "
            f"and the billing actor ~{billing_cap:,.0f} req/s (key checks, leases and usage record together), "
            f"against {engine_rps:,.1f} req/s from the engine: {ingress_cap / engine_rps:,.0f}x and "
            f"{billing_cap / engine_rps:,.0f}x headroom. The serving path comes with each engine replica (it scales "
            "with them); the billing actor is one replica for the whole deployment, so its figure is the ceiling of "
            "the control plane, however many engine replicas serve."
        )
    engine = args.get("engine_output_tokens_per_s")
    if engine and stream_best:
        ingress_tps = stream_best.run.output_tokens_per_s()
        source = f" ({args['engine_source']})" if args.get("engine_source") else ""
        lines.append(
            f"- **Engine replica elsewhere**: {engine:,.0f} output tokens/s{source}; the streaming serving path passed "
            f"{ingress_tps:,.0f} tokens/s here, **{ingress_tps / engine:,.1f}x** that."
        )
    return lines


def render(results: Results) -> str:
    m = results.machine_start
    args = results.args
    load = m["load_average"]
    lines = [
        "# Control-plane benchmark: an engine replica's serving path and the billing actor",
        "",
        "Generated by `loadtests/control_plane.py` (issue 7, part 4; the engine replica serving the API since issue "
        "14); every number comes from this one run:",
        "",
        "```",
        results.command,
        "```",
        "",
        f"- Run: {results.started:%Y-%m-%d %H:%M} UTC, {results.seconds:.0f} s in all.",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB; **shared with other work and noisy** "
        f"(load average {load[0]} / {load[1]} / {load[2]} at the start). Python {m['python']}, Ray {m['ray']}. The "
        "load client, Ray and every deployment share these cores, so absolute rates are low; CPU per request is the "
        "figure that carries over to other machines.",
        "- Stack: as `anker up` deploys it: Serve's HAProxy direct ingress (with Anker's model "
        "dispatch), the `Control` application, the real `Billing` actor (key check, rate limits, usage ledger on "
        "SQLite in a temp data folder) and **one** engine replica serving the OpenAI API with vLLM's own serving "
        "layer on the tiny model, its engine client replaced by `InstantOutputEngineDouble` (testkit/doubles.py): "
        f"{args['output_tokens']} tokens per answer, given as engine outputs of *tokens per output* tokens (1: one "
        "per token, as vLLM's engine gives them), the prompt's whole blocks reported as cached; no generation, no "
        "sleep.",
        f"- Load: a closed loop of N httpx clients, each sending its next chat completion when its last one ended, "
        f"{args['warmup_s']:g} s warm-up, then {args['duration_s']:g} s measured per row. Every answer is checked "
        "(token count, usage, `[DONE]`). Keys are made through the governance layer as `anker keys create` does, "
        "one organisation per row.",
        "- Ledger check: after each row the ledger must hold exactly one `ok` usage row per successful request "
        "(nothing lost, nothing doubled), with prompt, cached and output tokens summing to what the clients were told.",
        "",
        "## An engine replica through HAProxy",
        "",
        *_ingress_tables(results),
        "",
        *_native_tables(results),
        "## Billing actor: `record` through a deployment handle",
        "",
        "Batches of the outbox's own `UsageReport`s (prompt 100, cached 50, output 16 tokens), sent by concurrent "
        f"senders that each wait for their acknowledgement, {args['billing_duration_s']:g} s per row. An engine "
        "replica's outbox sends up to 256 reports per batch, one batch at a time. After each row one acknowledged "
        "batch is sent again (as after a lost acknowledgement): it must add nothing. Every setting is run in "
        f"{args.get('billing_rounds', 1)} rounds, interleaved (this machine's speed swings from minute to minute); "
        "a row shows the setting's round of median events/s, and the events/s of each round. Every round's ledger "
        "check must pass.",
        "",
        *_billing_table(results),
        "",
        "## Headroom",
        "",
        *_headroom(results),
        "",
        "How to read it: every process here shares two cores, so a req/s row is what the whole stack, load client "
        "included, manages together, not what one part alone could do; the *machine busy* column shows the cores "
        "were the limit. CPU per request is the figure that carries over: 1000 divided by a process's milliseconds "
        "is what one core of it carries. The engine double makes a token cost nothing, so the replica's cost per "
        "streamed output (vLLM's serving layer turning it into an OpenAI chunk, the meter counting it, the SSE "
        "bytes) is what bounds the tokens/s one replica's serving path passes beside its engine. The serving path "
        "comes with every engine replica; the billing actor does not scale out, so its cost per request (key checks, "
        "leases and usage record) bounds the whole deployment.",
        "",
    ]
    return "\n".join(lines)
