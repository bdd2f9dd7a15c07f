"""The control-plane benchmark: how many requests one engine replica's serving path carries through HAProxy, and how
many usage events the billing actor records, with generation taken out of the way (issues 7 and 14).

It deploys the stack as ``anker up`` does (HAProxy direct ingress, the control application and billing
actor, one application for the model whose engine replica serves the OpenAI API with vLLM's own serving layer), on
a Ray cluster of its own. The replica's engine client is ``InstantOutputEngineDouble``: vLLM's tokenizer, renderer,
parsers and the replica's door, meter and billing are real; only generation answers at once. The ledger (SQLite in
a temp data folder; PostgreSQL on request) is checked after every run, and a Markdown report written. It never
touches another Ray cluster (no ``ray stop``; a new local instance, shut down after).

    python -m loadtests.control_plane --report docs/benchmarks/control-plane.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from config.schema import AnkerConfig
from config.settings import DEFAULT_PROFILE, load_config
from deployments import database
from deployments.billing.governance import MAX_PER_MINUTE
from deployments.billing.ledger import Ledger
from loadtests import native_load, process_cpu
from loadtests.billing_load import check_recorded_once, drive_billing
from loadtests.control_plane_report import (
    BillingRow,
    IngressRow,
    LedgerCheck,
    NativeLedgerCheck,
    NativeRow,
    Results,
    machine,
    render,
)
from loadtests.http_load import LoadRun, run_load
from testkit.ports import free_port

RAY_NAMESPACE = "anker-control-plane-bench"
LEDGER_TIMEOUT_S = 60.0


_STARTED = time.monotonic()


def _say(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:5.0f}s] {message}", file=sys.stderr, flush=True)


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError("every number must be at least 1")
    return numbers


def bench_config(data_dir: Path, port: int, models_dir: Path | None) -> AnkerConfig:
    """The local profile with one model, its data in ``data_dir``, its HTTP port at ``port`` and HAProxy's own
    listeners and Serve's fallback proxy on free ports (its own: a stack already running here keeps its own)."""
    taken = {port}
    env = {
        "ANKER_DATA_DIR": str(data_dir),
        "ANKER_PORT": str(port),
        "ANKER__SERVER__HAPROXY_METRICS_PORT": str(free_port(taken)),
        "ANKER__SERVER__HAPROXY_STATS_PORT": str(free_port(taken)),
        "ANKER__SERVER__FALLBACK_PROXY_PORT": str(free_port(taken)),
    }
    config = load_config(DEFAULT_PROFILE, env)
    model = config.models[0]
    if models_dir is not None:
        model = model.model_copy(update={"path": models_dir.resolve() / model.name})
    return config.model_copy(update={"models": [model]})


@contextlib.contextmanager
def own_ray(env: dict[str, str]) -> Iterator[None]:
    """A new local Ray instance for this process (random ports, no dashboard), and Serve on it; both shut down.
    ``env`` is set first, in this process and so in every Ray process it starts (Serve reads HAProxy's switch when
    it is first imported)."""
    os.environ.update(env)
    import ray
    from ray import serve
    from ray.serve._private import constants

    if env.get("RAY_SERVE_ENABLE_HA_PROXY") and not constants.RAY_SERVE_ENABLE_HA_PROXY:
        raise RuntimeError("Ray Serve was imported before HAProxy's switch was set")

    for attempt in (1, 2):
        try:
            ray.init(
                address="local",
                num_cpus=8,
                include_dashboard=False,
                namespace=RAY_NAMESPACE,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
            break
        except Exception as exc:  # Ray gives its raylet 30 s to come up, which a busy shared machine can exceed
            ray.shutdown()
            if attempt == 2:
                raise
            _say(f"Ray did not start ({exc}); trying once more")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


# -- (a) an engine replica's serving path through HAProxy -------------------------------------------------------


def create_keys(config: AnkerConfig, tenants: Sequence[str]) -> dict[str, str]:
    """One key per tenant, made by the operator through the governance layer, exactly as `anker keys create` does."""
    from cluster import cli_billing

    billing = cli_billing.service(config)
    operator = cli_billing.actor()
    try:
        return {
            tenant: billing.governance.create_key(operator, tenant, rpm=MAX_PER_MINUTE, tpm=MAX_PER_MINUTE)[1]
            for tenant in tenants
        }
    finally:
        billing.ledger.dispose()


def engine_double(output_tokens: int, tokens_per_delta: int) -> Any:
    """The instant engine client double, which the engine replica puts under its meter in place of the real one."""
    from deployments.server.vllm_layer import EngineClientDouble
    from testkit.doubles import INSTANT_OUTPUT_ENGINE_DOUBLE

    settings = {"output_tokens": output_tokens, "tokens_per_delta": tokens_per_delta}
    return EngineClientDouble(INSTANT_OUTPUT_ENGINE_DOUBLE, settings)


def deploy_stack(config: AnkerConfig, double: Any | None) -> str:
    """The stack's applications, the engine client replaced by ``double`` unless None (then real vLLM),
    deployed or redeployed; returns the base URL once /healthz is 200."""
    from ray import serve

    from deployments.builder import build_apps

    apps = build_apps(config, engine_client_double=double)
    serve.run_many([serve.RunTarget(a.app, a.name, a.route_prefix) for a in apps])
    base_url = f"http://127.0.0.1:{config.server.port}"
    deadline = time.monotonic() + config.stack.startup_timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                return base_url
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not become healthy in {config.stack.startup_timeout_s:.0f}s")
        time.sleep(0.5)


def _ledger_rows(ledger: Ledger, tenant: str) -> list[dict[str, object]]:
    return list(ledger.events(tenant))


def _settled_rows(ledger: Ledger, tenant: str, successes: int) -> tuple[list[dict[str, object]], int]:
    """The tenant's ``ok`` rows and how many of other statuses, once the outbox has delivered (it flushes every
    0.2 s) at least ``successes`` of them, read again a second later to catch doubles."""
    deadline = time.monotonic() + LEDGER_TIMEOUT_S
    rows = _ledger_rows(ledger, tenant)
    while sum(1 for r in rows if r["status"] == "ok") < successes and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = _ledger_rows(ledger, tenant)
    time.sleep(1.0)  # a report sent twice, or a request billed under two ids, would land by now
    rows = _ledger_rows(ledger, tenant)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    return ok_rows, len(rows) - len(ok_rows)


def check_ledger(ledger: Ledger, tenant: str, run: LoadRun) -> LedgerCheck:
    """Waits for the outbox to deliver, then compares the ledger with what the clients were told."""
    check = LedgerCheck(successes=len(run.ok))
    ok_rows, check.other_rows = _settled_rows(ledger, tenant, check.successes)
    check.ok_rows = len(ok_rows)

    def total(column: str, answers: str) -> tuple[int, int]:
        return sum(int(str(r[column])) for r in ok_rows), sum(getattr(a, answers) for a in run.ok)

    sums = [total("completion_tokens", "completion_tokens"), total("prompt_tokens", "prompt_tokens")]
    sums.append(total("cached_tokens", "cached_tokens"))
    check.tokens_match = all(ledger_sum == seen for ledger_sum, seen in sums)
    check.cached_tokens = sums[2][0]
    return check


async def _measure(
    load: Coroutine[Any, Any, LoadRun], warmup_s: float, duration_s: float
) -> tuple[LoadRun, process_cpu.CpuUse]:
    """Runs the load and samples CPU at the start and end of its measured window."""
    task = asyncio.ensure_future(load)
    await asyncio.sleep(warmup_s)
    before = process_cpu.sample()
    await asyncio.sleep(duration_s)
    after = process_cpu.sample()
    return await task, process_cpu.between(before, after)


def ingress_benchmark(
    args: argparse.Namespace, config: AnkerConfig
) -> tuple[list[IngressRow], list[NativeRow], native_load.Profile | None]:
    """Rows per engine double item size, mode and client count; then, with --real-engine, a streaming row on vLLM.
    With --native-connections, the wrk rows (and the profile) run on the first double's stack, after its rows."""
    from ray import serve

    from cluster.local import ensure_models
    from testkit.doubles import InstantOutputEngineDouble

    ensure_models(config, _say)
    # Every client count with the first item size; the other sizes (which only split per-request from per-item
    # cost) and the real engine at the highest count.
    most = max(args.concurrency)
    first, *others = args.tokens_per_delta
    plan: list[tuple[int | None, bool, int]] = [(first, s, c) for s in (False, True) for c in args.concurrency]
    plan += [(d, s, most) for d in others for s in (False, True)]
    if args.real_engine:
        plan.append((None, True, most))
    keys = create_keys(config, [f"bench-{d or 'vllm'}-{'stream' if s else 'json'}-c{c}" for d, s, c in plan])
    serve.start(http_options={"host": "127.0.0.1", "port": config.server.port})
    ledger = Ledger(database.database_url(config.data_dir, None))
    rows: list[IngressRow] = []
    native: list[NativeRow] = []
    profile = None
    last_of_first = max(i for i, (per_delta, _, _) in enumerate(plan) if per_delta == first)
    try:
        for i, ((per_delta, stream, concurrency), (tenant, key)) in enumerate(zip(plan, keys.items(), strict=True)):
            if not rows or rows[-1].tokens_per_delta != per_delta:
                what = f"the instant engine client double, {per_delta} token(s) per output" if per_delta else "vLLM"
                _say(f"deploying the stack, its engine replica on {what} ...")
                double = engine_double(args.output_tokens, per_delta) if per_delta else None
                base_url = deploy_stack(config, double)
            load = run_load(
                base_url,
                key,
                config.models[0].name,
                stream=stream,
                concurrency=concurrency,
                output_tokens=args.output_tokens,
                duration_s=args.duration_s,
                warmup_s=args.warmup_s,
                piece=InstantOutputEngineDouble.TOKEN_TEXT if per_delta is not None else None,
            )
            run, cpu = asyncio.run(_measure(load, args.warmup_s, args.duration_s))
            row = IngressRow(run, per_delta, cpu, check_ledger(ledger, tenant, run))
            rows.append(row)
            _say(
                f"  {row.engine:<20} {row.label:<6} c={concurrency:<3} {run.requests_per_s():7.1f} req/s  "
                f"p50 {run.latency_ms(0.5):7.1f} ms  p99 {run.latency_ms(0.99):7.1f} ms  "
                f"errors {sum(run.errors.values())}  "
                f"ledger {'ok' if row.ledger.passed else 'MISMATCH'} ({row.ledger.ok_rows}/{row.ledger.successes})"
            )
            if i == last_of_first:  # the first double's stack, before the next is deployed
                native, profile = native_benchmark(args, config, base_url, ledger, first)
    finally:
        ledger.dispose()
        for app in serve.status().applications:
            serve.delete(app)
    return rows, native, profile


# -- (a2) the same replica under a native load client, and where its time goes ----------------------------------


def check_native_ledger(ledger: Ledger, tenant: str, run: native_load.WrkRun, output_tokens: int) -> NativeLedgerCheck:
    """wrk does not read answers, so the ledger is checked against its counts: every answer it got with 200 billed
    (``ok`` rows at least its successes), none billed twice (at most one more per connection: a request the
    replica finished while wrk closed its connections at the end), each for the double's exact answer length."""
    check = NativeLedgerCheck(successes=run.successes, connections=run.connections)
    ok_rows, check.other_rows = _settled_rows(ledger, tenant, check.successes)
    check.ok_rows = len(ok_rows)
    check.lengths_match = all(int(str(r["completion_tokens"])) == output_tokens for r in ok_rows)
    return check


def native_benchmark(
    args: argparse.Namespace, config: AnkerConfig, base_url: str, ledger: Ledger, tokens_per_delta: int
) -> tuple[list[NativeRow], native_load.Profile | None]:
    """JSON and streamed rows under wrk on the deployed stack (its engine double gives ``tokens_per_delta`` tokens
    an output), at each ``--native-connections``; then, with ``--profile-s``, one more JSON run at the first count
    while py-spy samples the engine replica."""
    if not args.native_connections:
        return [], None
    plan = [(stream, c) for stream in (False, True) for c in args.native_connections]
    tenants = [f"native-{'stream' if s else 'json'}-c{c}" for s, c in plan]
    keys = create_keys(config, ["native-warm-up", "native-profile", *tenants])
    rows: list[NativeRow] = []
    profile = None
    for (stream, connections), tenant in zip(plan, tenants, strict=True):
        wrk = native_load.Wrk(base_url, config.models[0].name, args.output_tokens, stream)
        try:
            wrk.start(keys["native-warm-up"], connections, args.warmup_s)
            wrk.finish()
            before = process_cpu.sample()
            wrk.start(keys[tenant], connections, args.duration_s)
            run = wrk.finish()
            cpu = process_cpu.between(before, process_cpu.sample())
        finally:
            wrk.close()
        row = NativeRow(run, tokens_per_delta, cpu, check_native_ledger(ledger, tenant, run, args.output_tokens))
        rows.append(row)
        _say(
            f"  wrk {'stream' if stream else 'JSON':<6} c={connections:<3} {run.requests_per_s:7.1f} req/s  "
            f"p50 {run.latency_ms.get('50%', float('nan')):7.1f} ms  non-2xx {run.not_2xx}  "
            f"ledger {'ok' if row.ledger.passed else 'MISMATCH'} ({row.ledger.ok_rows}/{row.ledger.successes})"
        )
    if args.profile_s:
        engine = process_cpu.pids_of("Engine")
        if len(engine) != 1:
            raise RuntimeError(f"expected one engine replica process to profile, found {len(engine)}")
        wrk = native_load.Wrk(base_url, config.models[0].name, args.output_tokens, False)
        try:
            wrk.start(keys["native-profile"], args.native_connections[0], args.profile_s + 2)
            profile = native_load.profile_gil(engine[0], args.profile_s)
            wrk.finish()
        finally:
            wrk.close()
        _say(f"  profiled the engine replica for {args.profile_s:g} s: {profile.samples} samples holding the GIL")
    return rows, profile


# -- (b) the billing actor alone --------------------------------------------------------------------------------


def billing_benchmark(
    args: argparse.Namespace, data_dir: Path, label: str, database_url: str | None
) -> list[BillingRow]:
    """The billing actor alone, as the builder configures it, on SQLite (``database_url`` None) or PostgreSQL."""
    from ray import serve

    from deployments.billing.actor import Billing
    from deployments.billing.service import billing_spec

    config = bench_config(data_dir, free_port(), args.models_dir)
    config = config.model_copy(update={"database_url": database_url})
    app = f"billing-{label.lower()}"
    _say(f"deploying the billing actor on {label} ...")
    deployment = Billing.options(ray_actor_options={"num_cpus": config.billing.num_cpus})  # type: ignore[attr-defined]
    handle = serve.run(deployment.bind(billing_spec(config)), name=app, route_prefix=None)
    ledger = Ledger(database.database_url(config.data_dir, database_url))
    postgres = process_cpu.postgres_root(database_url) if database_url else None

    async def measure() -> list[BillingRow]:
        # One event loop for every row: Serve binds the handle's router to the loop that first uses it. The rows
        # are run in rounds, each setting once a round, so that each setting meets the machine's swings alike.
        rows = []
        settings = itertools.product(range(args.billing_rounds), args.billing_senders, args.batch_sizes)
        for round_, senders, batch_size in settings:
            tenant = f"bench-{label.lower()}-s{senders}-b{batch_size}-r{round_}"
            before = process_cpu.sample(postgres)
            run, replay = await drive_billing(
                handle,
                label,
                tenant,
                "bench-key",
                config.models[0].name,
                batch_size=batch_size,
                senders=senders,
                duration_s=args.billing_duration_s,
            )
            cpu = process_cpu.between(before, process_cpu.sample(postgres))
            await check_recorded_once(handle, ledger, run, replay)
            rows.append(BillingRow(run, cpu, round_))
            _say(
                f"  {label:<10} round {round_ + 1} senders={senders} batch={batch_size:<4} "
                f"{run.events_per_s:8.0f} events/s  "
                f"call p50 {run.call_ms_median():7.1f} ms  recorded once: {'yes' if run.recorded_once else 'NO'}"
            )
        return rows

    try:
        return asyncio.run(measure())
    finally:
        ledger.dispose()
        serve.delete(app)


# -- the command ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.control_plane",
        description="Control-plane benchmark: requests/s of one engine replica's serving path through HAProxy (the "
        "replica's door, vLLM's serving layer and the billing actor are real; generation answers at once), and usage "
        "events/s of the billing actor on SQLite (and PostgreSQL with --postgres). Starts a Ray instance of its own "
        "and shuts it down.",
    )
    load = parser.add_argument_group("ingress load")
    load.add_argument("--concurrency", type=_int_list, default=[1, 4, 16], help="client counts (default: 1,4,16)")
    load.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per row (default: 8)")
    load.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each row (default: 2)")
    load.add_argument(
        "--native-connections",
        type=_int_list,
        default=[],
        help="also drive the replica with wrk at these connection counts, JSON and streamed (e.g. 16,64)",
    )
    load.add_argument(
        "--profile-s",
        type=float,
        default=0.0,
        help="with --native-connections: then profile the engine replica with py-spy for this long under wrk",
    )
    load.add_argument("--output-tokens", type=int, default=16, help="tokens per answer (default: 16)")
    load.add_argument(
        "--tokens-per-delta",
        type=_int_list,
        default=[1, 16],
        help="tokens per engine output the double gives (default: 1,16): every client count with the first, the "
        "highest with the others (1: one output per token, as vLLM's engine gives them; 16: the whole answer in one, "
        "which separates the cost per request from the cost per streamed chunk)",
    )
    billing = parser.add_argument_group("billing load")
    billing.add_argument("--batch-sizes", type=_int_list, default=[1, 16, 256], help="default: 1,16,256")
    billing.add_argument("--billing-senders", type=_int_list, default=[1, 4], help="concurrent senders (default: 1,4)")
    billing.add_argument("--billing-duration-s", type=float, default=4.0, help="seconds per row (default: 4)")
    billing.add_argument(
        "--billing-rounds",
        type=int,
        default=3,
        help="rounds of every billing row, interleaved; the report shows each setting's median round and the "
        "range (default: 3)",
    )
    billing.add_argument("--postgres", action="store_true", help="also on a throwaway PostgreSQL (testkit/postgres.py)")
    parser.add_argument(
        "--real-engine",
        action="store_true",
        help="then stream through the real vLLM engine on the tiny model, same clients: what an engine produces here",
    )
    parser.add_argument("--models-dir", type=Path, help="folder with the tiny model (built there if missing)")
    parser.add_argument(
        "--engine-output-tokens-per-s",
        type=float,
        help="output tokens/s one engine replica produces, for the headroom comparison",
    )
    parser.add_argument("--engine-source", default="", help="where the engine figure comes from (shown in the report)")
    parser.add_argument("--report", type=Path, help="write the Markdown report here")
    parser.add_argument("--json", type=Path, help="write the raw results as JSON here")
    return parser


@contextlib.contextmanager
def _removed(folder: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args: argparse.Namespace, command: str) -> Results:
    from cluster.local import haproxy_dir, haproxy_env

    started, machine_at_start = datetime.now(UTC), machine()
    with tempfile.TemporaryDirectory(prefix="anker-cp-bench-") as tmp:
        root = Path(tmp)
        config = bench_config(root / "ingress", free_port(), args.models_dir)
        config.run_dir.mkdir(parents=True)
        with own_ray(haproxy_env(config)), _removed(haproxy_dir(config)):
            ingress, native, profile = ingress_benchmark(args, config)
            billing = billing_benchmark(args, root / "billing-sqlite", "SQLite", None)
            if args.postgres:
                from testkit.postgres import throwaway_postgres

                with throwaway_postgres() as url:
                    billing += billing_benchmark(args, root / "billing-postgres", "PostgreSQL", url)
    return Results(
        command=command,
        started=started,
        seconds=(datetime.now(UTC) - started) / timedelta(seconds=1),
        args=vars(args),
        ingress=ingress,
        native=native,
        profile=profile,
        billing=billing,
        machine_start=machine_at_start,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m loadtests.control_plane " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    results = run(args, command)
    if args.json:
        args.json.write_text(json.dumps(results.summary(), indent=2, default=str) + "\n", encoding="utf-8")
    text = render(results)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text, encoding="utf-8")
        _say(f"wrote {args.report}")
    else:
        print(text)
    return 0 if results.all_checks_passed else 1


if __name__ == "__main__":
    sys.exit(main())
