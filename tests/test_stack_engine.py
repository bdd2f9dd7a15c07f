"""Engine behaviour on the real stack: seeded requests cannot kill an engine, a disconnect aborts the vLLM request,
a key created while the stack runs works at once, and vLLM's CPU workers have their core to themselves. Engine state
is read through Ray Serve deployment handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest

from cluster.local import read_state
from config.schema import OMP_BIND_ENV, omp_bind_cpus
from tests.conftest import MODELS, Stack, engine_of
from tests.traffic import ledger_totals

pytestmark = pytest.mark.stack

SEED_PROMPT = "Ræven løb over den grønne bro, og på den anden side stod en gammel mølle ved åen. " * 25


@pytest.fixture(scope="module")
def engines(stack: Stack) -> Iterator[dict[str, object]]:
    """Each model's engine deployment, by a handle into the model's own application."""
    import ray
    from ray import serve

    stack.connect()  # a driver on the stack's cluster, with its Ray auth token
    handles: dict[str, object] = {}
    for model in MODELS:
        app, deployment = engine_of(model)
        handles[model] = serve.get_deployment_handle(deployment, app_name=app)
    try:
        yield handles
    finally:
        ray.shutdown()


def load(engines: dict[str, object], model: str) -> dict[str, float]:
    """vLLM's queue on the model's replica: running, waiting and in-flight requests."""
    result: dict[str, float] = engines[model].record_routing_stats.remote().result(timeout_s=30)  # type: ignore[attr-defined]
    return result


async def test_seeded_requests_do_not_kill_the_engine_and_are_reproducible(
    stack: Stack, engines: dict[str, object]
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)

    async def ask(seed: int | None, model: str = "qwen3-next-tiny") -> str:
        # The long prompt is prefilled in several chunks: the case that crashed vLLM's CPU engine core.
        r = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": SEED_PROMPT}],
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},  # all of it content, none reasoning
        )
        return r.choices[0].message.content or ""

    first = await asyncio.gather(ask(1), ask(2), ask(None), ask(1), ask(3, "qwen3-moe-tiny"))
    assert first[0] == first[3], "the same seed and prompt must give the same completion"
    assert first[0] != first[1], "different seeds should give different completions"
    # Once more, now with the prompt in the prefix cache (a different prefill split): still the same output.
    assert await ask(1) == first[0]
    assert await engines["qwen3-next-tiny"].ready.remote()  # type: ignore[attr-defined]
    assert (await ask(None)) is not None  # the engine still serves unseeded requests


def test_client_disconnect_aborts_the_engine_request(stack: Stack, engines: dict[str, object]) -> None:
    key = stack.new_key("disconnects")
    before = ledger_totals(stack.base_url, key)
    body = {
        "model": "qwen3-next-tiny",
        "messages": [{"role": "user", "content": "Fortæl en lang historie."}],
        "max_tokens": 1500,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data:")
            if chunks == 5:
                # Still connected (leaving this loop closes the response): the request runs in the engine.
                assert load(engines, "qwen3-next-tiny")["in_flight"] >= 1
                break
    # The client is gone: the vLLM request must be aborted long before its 1500 tokens would have been generated.
    deadline = time.monotonic() + 20
    after = load(engines, "qwen3-next-tiny")
    while time.monotonic() < deadline and after["in_flight"]:
        time.sleep(0.2)
        after = load(engines, "qwen3-next-tiny")
    assert after["in_flight"] == 0 and after["running"] == 0, after
    # Billed once, for what was generated until the abort.
    deadline = time.monotonic() + 30
    while (now := ledger_totals(stack.base_url, key))["requests"] == before["requests"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert now["requests"] == before["requests"] + 1
    assert 1 <= now["output_tokens"] - before["output_tokens"] < 1500, now


def test_key_created_while_running_works_at_once(stack: Stack) -> None:
    key = stack.new_key("late-comer")
    r = httpx.get(f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_status_reports_a_healthy_stack(stack: Stack) -> None:
    status = stack.anker("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for model in ("qwen3-next-tiny", "qwen3-moe-tiny"):
        assert model in status.stdout


def _thread_cpus(process: psutil.Process) -> set[frozenset[int]]:
    cpus = set()
    for thread in process.threads():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            cpus.add(frozenset(os.sched_getaffinity(thread.id)))
    return cpus


def test_cpu_workers_have_their_cores_to_themselves(stack: Stack) -> None:
    """The local profile pins the head (``ray.cpu_affinity``): every thread of every process it started (Ray's,
    Serve's, HAProxy, the replicas) runs on those CPUs, and vLLM's CPU workers, with the engine cores that drive
    them, on the cores their ``VLLM_CPU_OMP_THREADS_BIND`` names."""
    config = stack.config
    state = read_state(config)
    assert state is not None and config.ray.cpu_affinity
    pinned = frozenset(config.ray.cpu_affinity)
    bound = frozenset().union(*(omp_bind_cpus(m.engine_env[OMP_BIND_ENV]) for m in config.models))
    head = psutil.Process(state.head_pid)
    workers: dict[int, set[frozenset[int]]] = {}
    engine_cores: dict[int, set[frozenset[int]]] = {}
    others: dict[str, set[frozenset[int]]] = {}
    for process in [head, *head.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            name = process.name()
            if name.startswith("VLLM::Worker"):
                workers[process.pid] = _thread_cpus(process)
            elif name.startswith("VLLM::EngineCore"):
                engine_cores[process.pid] = _thread_cpus(process)
            else:
                others.setdefault(name, set()).update(_thread_cpus(process))
    assert len(workers) == len(config.models), workers  # one engine replica of each model, one worker each
    assert all(cpus == {bound} for cpus in workers.values()), workers
    assert len(engine_cores) == len(workers) and all(cpus == {bound} for cpus in engine_cores.values()), engine_cores
    assert {"raylet", "haproxy"} <= others.keys(), sorted(others)
    assert all(cpus == {pinned} for cpus in others.values()), others
