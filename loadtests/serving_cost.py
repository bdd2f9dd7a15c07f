"""What one request costs an engine replica's serving path, beside vLLM's own API server over the same engine.

Both apps run in this one process over one vLLM engine (the tiny model's ``AsyncLLM``, with the profile's parsers),
whose engine client is ``InstantOutputEngineDouble``: it answers at once, so generation costs nothing and what is
left is serving. One app is vLLM's own, as ``vllm serve`` builds it (``build_app`` and ``init_app_state``); the other
is Anker's, as an engine replica builds it (``deployments/server/replica.py::serving_app``: vLLM's serving objects
under Anker's routes, the meter, the door with the billing deployment's own class on a SQLite ledger, back-pressure,
metrics, tracing and the drain gate). Requests go in through httpx's in-process ASGI transport (no socket and no
HAProxy: the app is what is measured), a few at a time, chat completions answered whole and streamed, the two apps
interleaved over rounds. The figure is this process's CPU time per request, every thread's (vLLM's tokenizer pool,
billing's database thread); 1,000 divided by it is what one core of either carries.

    python -m loadtests.serving_cost --report docs/benchmarks/serving-cost.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

COMMAND = "python -m loadtests.serving_cost --report docs/benchmarks/serving-cost.md"
OUTPUT_TOKENS = 16
MAX_PER_MINUTE = 10**9  # the key's limits: never what stops a request here
QUESTION = [{"role": "user", "content": "Hvad koster en rødgrød med fløde?"}]


@dataclass
class App:
    name: str
    client: httpx.AsyncClient
    headers: dict[str, str]
    requests: int = 0  # answered


def body(model: str, stream: bool) -> dict[str, Any]:
    chat: dict[str, Any] = {"model": model, "messages": QUESTION, "max_tokens": OUTPUT_TOKENS, "stream": stream}
    if stream:
        chat["stream_options"] = {"include_usage": True}
    return chat


async def one(app: App, chat: dict[str, Any]) -> None:
    r = await app.client.post("/v1/chat/completions", json=chat, headers=app.headers)
    if r.status_code != 200:
        raise RuntimeError(f"{app.name} answered {r.status_code}: {r.text[:300]}")
    if chat["stream"] and not r.text.rstrip().endswith("data: [DONE]"):
        raise RuntimeError(f"{app.name}'s stream did not end with [DONE]")
    app.requests += 1


async def cpu_ms_per_request(app: App, chat: dict[str, Any], requests: int, concurrency: int) -> float:
    """``requests`` requests, ``concurrency`` at a time; this process's CPU milliseconds per request."""
    left = list(range(requests))

    async def client() -> None:
        while left:
            left.pop()
            await one(app, chat)

    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return (time.process_time() - started) / requests * 1000


@contextlib.asynccontextmanager
async def apps(models_dir: Path, data_dir: Path) -> AsyncIterator[tuple[str, App, App]]:
    """vLLM's own app and an engine replica's, over one engine whose client is the instant double."""
    from fastapi import FastAPI
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    from cluster.tiny_models import build_model, is_built
    from config.settings import DEFAULT_PROFILE, load_config
    from deployments.billing.actor import Billing
    from deployments.billing.client import ServeBillingClient
    from deployments.billing.governance import Actor
    from deployments.billing.service import billing_spec
    from deployments.builder import engine_deadlines, engine_env, engine_spec, served_models
    from deployments.openai.catalog import model_card
    from deployments.server.replica import serving_app
    from deployments.server.vllm_layer import ServingSpec, VllmLayer
    from loadtests.control_plane import engine_double
    from testkit.doubles import InProcessHandleDouble

    config = load_config(DEFAULT_PROFILE, {"ANKER_DATA_DIR": str(data_dir)})
    model = config.models[0]
    path = models_dir / model.name
    if not is_built(path):
        build_model(path, "qwen3-next" if "next" in model.name else "qwen3-moe")
    model = model.model_copy(update={"path": path})
    config = config.model_copy(update={"models": [model]})
    before = dict(os.environ)
    os.environ.update({k: v for k, v in engine_env(model).items() if not k.startswith("VLLM_CPU_OMP")})
    double = engine_double(OUTPUT_TOKENS, 1)
    serving = ServingSpec(
        engine_spec(config, model),
        model.serving.reasoning_parser,
        model.serving.tool_call_parser,
        engine_client_double=double,
    )
    layer = VllmLayer(serving)
    await layer.start()
    billing = Billing.func_or_class(billing_spec(config))  # type: ignore[attr-defined]
    accounts = ServeBillingClient(InProcessHandleDouble(billing), 10.0, 0.2)  # type: ignore[arg-type]
    # The usage outbox is not flushed while the clock runs: recording usage is the billing actor's work, in a
    # process of its own (docs/benchmarks/control-plane.md measures it). What the replica does, queueing each
    # report, is measured; the reports are delivered at the end and the ledger checked.
    tasks = [asyncio.create_task(accounts.admission.run())]
    try:
        # vLLM's own: `vllm serve`'s app and serving objects, over the same engine client, the double in it.
        own: FastAPI = build_app(layer.args, await layer.llm.get_supported_tasks(), layer.llm.model_config)
        await init_app_state(double.wrap(layer.llm), own.state, layer.args, await layer.llm.get_supported_tasks())
        served = served_models(config, 0)[0]
        card = model_card(served.name, served.created, served.owned_by, served.max_model_len)
        ankers = serving_app(
            layer.state,
            model.name,
            [card],
            config.server.max_request_bytes,
            accounts,
            model.region,
            config.stack.engine_max_ongoing_requests + config.stack.engine_max_queued_requests,
            config.stack.overload_retry_after_s,
            "serving-cost",
            engine_deadlines(config),
        )
        _, key = billing._service.governance.create_key(
            Actor.operator("serving-cost"), "serving-cost", rpm=MAX_PER_MINUTE, tpm=MAX_PER_MINUTE
        )
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=own), base_url="http://vllm", timeout=60) as a,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=ankers), base_url="http://anker", timeout=60) as b,  # type: ignore[arg-type]
        ):
            anker = App("Anker", b, {"Authorization": f"Bearer {key}"})
            yield model.name, App("vLLM", a, {}), anker
            if not await accounts.outbox.drain(timeout_s=120):
                raise RuntimeError("the usage reports were not recorded")
            recorded = len(list(billing._service.ledger.events("serving-cost")))
            if recorded != anker.requests:
                raise RuntimeError(f"the ledger holds {recorded} requests, Anker's app answered {anker.requests}")
    finally:
        for task in tasks:
            task.cancel()
        billing._sweeper.cancel()
        billing._service.ledger.dispose()
        layer.shutdown()
        os.environ.clear()
        os.environ.update(before)


async def measure(rounds: int, requests: int, concurrency: int, models_dir: Path) -> list[dict[str, Any]]:
    from deployments.server import parser_memo

    with tempfile.TemporaryDirectory(prefix="anker-serving-cost-") as data_dir:
        async with apps(models_dir, Path(data_dir)) as (model, vllm, anker):
            rows = []
            for stream in (False, True):
                chat = body(model, stream)
                for app in (vllm, anker):  # first calls (templates compiled, keys looked up) before the clock runs
                    await cpu_ms_per_request(app, chat, concurrency, concurrency)
                vllm_ms: list[float] = []
                anker_ms: list[float] = []
                for _ in range(rounds):
                    parser_memo.uninstall()  # vLLM's app as vLLM ships it
                    vllm_ms.append(await cpu_ms_per_request(vllm, chat, requests, concurrency))
                    parser_memo.install()  # as an engine replica runs
                    anker_ms.append(await cpu_ms_per_request(anker, chat, requests, concurrency))
                rows.append(
                    {
                        "mode": "streamed" if stream else "whole (JSON)",
                        "vllm_ms": vllm_ms,
                        "anker_ms": anker_ms,
                        "added_ms": [a - v for a, v in zip(anker_ms, vllm_ms, strict=True)],
                        "ratio": [a / v for a, v in zip(anker_ms, vllm_ms, strict=True)],
                    }
                )
            return rows


def report(rows: list[dict[str, Any]], rounds: int, requests: int, concurrency: int) -> str:
    from statistics import median

    from loadtests.bench import machine
    from loadtests.bench_report import _spread

    lines = [
        "# An engine replica's serving path, beside vLLM's own API server",
        "",
        f"Generated by `{COMMAND}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        *(f"- {key}: {value}" for key, value in machine().items()),
        "",
        "Both apps in one process over one engine whose client answers at once (`InstantOutputEngineDouble`, "
        f"{OUTPUT_TOKENS} tokens an answer, one per engine output): vLLM's own app as `vllm serve` builds it, and "
        "Anker's as an engine replica builds it (the door, admission from leases granted by the billing deployment's "
        "class on SQLite, the meter, the usage outbox, back-pressure, metrics, tracing, the drain gate; the reports "
        "are delivered to billing after the rounds, and the ledger must hold one row per request; and the memo of "
        "vLLM's per-request parser build, `deployments/server/parser_memo.py`, which vLLM's rounds run without). "
        "Both include the in-process httpx client's own CPU, the same for both. Requests through "
        f"httpx's in-process ASGI transport, {concurrency} at a time, {requests} per app and round, {rounds} rounds, "
        "the apps interleaved. CPU milliseconds of the process per request (every thread); median [lowest, highest "
        "round]. *Added* and the ratio are Anker's against vLLM's in the same round.",
        "",
        "| answer | vLLM's app (ms CPU) | Anker's replica app (ms CPU) | added (ms) | ratio | "
        "req/s a core carries: vLLM / Anker |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        per_core = f"{1000 / median(r['vllm_ms']):,.0f} / {1000 / median(r['anker_ms']):,.0f}"
        lines.append(
            f"| {r['mode']} | {_spread(r['vllm_ms'], 2)} | {_spread(r['anker_ms'], 2)} | {_spread(r['added_ms'], 2)} "
            f"| {_spread(r['ratio'], 2)} | {per_core} |"
        )
    lines += [
        "",
        "What this leaves out, and `docs/benchmarks/control-plane.md` measures: the socket and HTTP parsing "
        "(uvicorn, Serve's direct ingress), HAProxy in front, and the billing actor in a process of its own. Ray's "
        "metrics are recorded without a Ray instance here, so at almost no cost.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=400, help="requests per app and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--models-dir", type=Path, default=Path(".anker") / "models", help="the tiny model's folder")
    parser.add_argument("--report", type=Path, help="write the Markdown report here (else print it)")
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.rounds, args.requests, args.concurrency, args.models_dir.resolve()))
    text = report(rows, args.rounds, args.requests, args.concurrency)
    from loadtests.bench_report import write_or_print

    write_or_print(text, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
