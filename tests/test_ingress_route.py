"""The model application's ingress request router (deployments/server/route.py) and its Serve policy
(deployments/router.py::IngressPrefixRouter), without Ray: the prompt blocks it reads off a request body, the
answers HAProxy gets at /internal/route, and the picks of a router that is never told where a request went."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from ray.serve.exceptions import DeploymentUnavailableError

from deployments.router import ROUTE_HASHES, IngressPrefixRouter, PickLoad, PrefixRouting
from deployments.server.route import MAX_ROUTED_CHARS, ROUTE_PATH, Hashes, PromptBlocks, RouteApp

MODEL = "qwen3-moe-tiny"
BLOCK = 16
MANUAL = "You answer questions about the operator's manual. " * 60  # a long shared system prompt


@pytest.fixture(scope="module")
def blocks(tiny_models: dict[str, Path]) -> PromptBlocks:
    return PromptBlocks(tiny_models[MODEL], BLOCK, max_body_bytes=1024 * 1024)


def chat(question: str, **extra: Any) -> bytes:
    messages = [{"role": "system", "content": MANUAL}, {"role": "user", "content": question}]
    return json.dumps({"model": MODEL, "messages": messages, **extra}).encode()


def shared(a: Hashes, b: Hashes) -> int:
    """How many leading block hashes two prompts share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_chats_that_share_a_system_prompt_share_its_blocks_and_part_after_it(blocks: PromptBlocks) -> None:
    first, second = blocks(chat("Where is the fuse?")), blocks(chat("How do I reset it?"))
    assert first is not None and second is not None
    assert len(first) > 20, len(first)  # the manual's blocks
    assert len(first) - 2 <= shared(first, second) < len(first), (shared(first, second), len(first))
    assert blocks(chat("Where is the fuse?")) == first  # the same prompt, the same blocks, every time


def test_the_tools_are_part_of_the_prompt(blocks: PromptBlocks) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    plain, tooled = blocks(chat("Where is the fuse?")), blocks(chat("Where is the fuse?", tools=[tool]))
    assert plain is not None and tooled is not None and plain != tooled


def test_a_prompt_cache_key_groups_requests_and_keeps_groups_apart(blocks: PromptBlocks) -> None:
    plain = blocks(chat("Where is the fuse?"))
    keyed = blocks(chat("Where is the fuse?", prompt_cache_key="team-a"))
    other = blocks(chat("Something else entirely", prompt_cache_key="team-a"))
    apart = blocks(chat("Where is the fuse?", prompt_cache_key="team-b"))
    assert plain is not None and keyed is not None and other is not None and apart is not None
    assert keyed[0] == other[0], "one key's requests share their first block, whatever they ask"
    assert shared(keyed, apart) == 0 and shared(keyed, plain) == 0
    assert len(keyed) == len(plain) + 1


def test_completions_and_responses_bodies_give_their_prompts_blocks(blocks: PromptBlocks) -> None:
    text = MANUAL + "Question: where is the fuse?"
    by_text = blocks(json.dumps({"model": MODEL, "prompt": text}).encode())
    assert by_text is not None and len(by_text) > 20
    assert blocks(json.dumps({"model": MODEL, "prompt": [text, "another"]}).encode()) == by_text
    ids = list(range(100, 180))
    assert blocks(json.dumps({"model": MODEL, "prompt": ids}).encode()) == blocks(
        json.dumps({"model": MODEL, "prompt": [ids]}).encode()
    )
    as_chat = blocks(chat("Where is the fuse?"))
    as_response = blocks(json.dumps({"model": MODEL, "instructions": MANUAL, "input": "Where is the fuse?"}).encode())
    assert as_response == as_chat  # the replica renders a Responses request with the same template
    items = [{"type": "message", "role": "user", "content": "Where is the fuse?"}]
    assert blocks(json.dumps({"model": MODEL, "instructions": MANUAL, "input": items}).encode()) == as_chat


def test_only_the_head_of_a_long_prompt_is_read_and_a_body_over_the_limit_not_at_all(blocks: PromptBlocks) -> None:
    head = blocks(chat("x" * MAX_ROUTED_CHARS))
    assert head is not None and head == blocks(chat("x" * MAX_ROUTED_CHARS * 10)), "past the head, all the same"
    assert len(head) * BLOCK <= MAX_ROUTED_CHARS
    assert blocks(chat("y" * 2 * 1024 * 1024)) is None  # the replica answers 413


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"model": "qwen3-moe-tiny", "messages": [{"role": "user", "content": "cut sho',  # HAProxy's buffer
        b"[1, 2, 3]",
        b'{"model": "qwen3-moe-tiny"}',
        b'{"model": "qwen3-moe-tiny", "messages": []}',
        b'{"model": "qwen3-moe-tiny", "messages": "not a list"}',
        b'{"model": "qwen3-moe-tiny", "prompt": [1, "two"]}',
        b'{"model": "qwen3-moe-tiny", "input": 7}',
    ],
)
def test_a_body_it_cannot_read_is_routed_by_load_alone(blocks: PromptBlocks, body: bytes) -> None:
    assert blocks(body) is None


class Picks:
    """What ``RouteApp`` asked of its pick; answers ``answer`` (or raises it) after ``delay_s``."""

    def __init__(self, answer: str | Exception = "SERVE_REPLICA::model-m#Engine-m#abc", delay_s: float = 0.0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.asked: list[Hashes | None] = []

    async def __call__(self, hashes: Hashes | None) -> str:
        self.asked.append(hashes)
        await asyncio.sleep(self.delay_s)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def _ask(app: RouteApp, method: str = "POST", path: str = ROUTE_PATH, body: bytes = b"") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        return await client.request(method, path, content=body)


async def test_haproxy_gets_the_replica_the_pick_chose_for_the_bodys_prompt() -> None:
    picks = Picks()
    app = RouteApp(lambda body: (len(body),) if body else None, picks, timeout_s=1.0)
    answer = await _ask(app, body=b"12345")
    assert answer.status_code == 200 and answer.json() == {"replica_id": "SERVE_REPLICA::model-m#Engine-m#abc"}
    assert (await _ask(app)).status_code == 200
    assert picks.asked == [(5,), None]


@pytest.mark.parametrize(
    ("picks", "status"),
    [
        (Picks(DeploymentUnavailableError("model-m#Engine-m")), 503),  # type: ignore[arg-type]
        (Picks(delay_s=5.0), 503),  # no replica came up in time
    ],
)
async def test_no_replica_is_a_routing_failure_haproxy_answers_with_503(picks: Picks, status: int) -> None:
    answer = await _ask(RouteApp(lambda body: None, picks, timeout_s=0.2), body=b"{}")
    assert answer.status_code == status and "replica_id" not in answer.json()


async def test_the_router_answers_only_its_route() -> None:
    app = RouteApp(lambda body: None, Picks(), timeout_s=1.0)
    assert (await _ask(app, path="/v1/chat/completions")).status_code == 404
    assert (await _ask(app, method="GET")).status_code == 405


def test_the_load_of_a_replica_is_what_it_reported_or_what_was_sent_to_it_lately() -> None:
    now = [0.0]
    load: PickLoad[str] = PickLoad(10.0, clock=lambda: now[0])
    for _ in range(3):
        load.picked("a")
    assert load("a", reported=1) == 3 and load("a", reported=5) == 5 and load("b", reported=0) == 0
    now[0] = 10.5
    assert load("a", reported=1) == 1, "picks older than the window no longer count"
    load.picked("a")
    load.forget("a")
    assert load.recent("a") == 0


def test_the_policy_weighs_the_load_it_is_given() -> None:
    routing: PrefixRouting[str] = PrefixRouting(2, 1000, random.Random(3))
    hashes = (1, 2, 3)
    routing.table.insert(hashes, "a")
    assert routing.choose(["a", "b"], hashes, load={"a": 0, "b": 0}.get).ranks[0] == ["a"]
    busy = routing.choose(["a", "b"], hashes, load={"a": 5, "b": 0}.__getitem__)
    assert busy.decision == "overloaded"


def _replica(name: str, in_flight: float = 0.0) -> Any:
    return SimpleNamespace(replica_id=name, routing_stats={"in_flight": in_flight})


def _pending(hashes: Hashes | None) -> Any:
    return SimpleNamespace(kwargs={ROUTE_HASHES: hashes}, routing_context=SimpleNamespace(should_backoff=False))


def _serve_router(max_imbalance: int = 4) -> IngressPrefixRouter:
    router = IngressPrefixRouter.__new__(IngressPrefixRouter)  # Serve's constructor wants a running deployment
    router.initialize_state(model=MODEL, max_imbalance=max_imbalance, max_blocks=1000, load_window_s=60.0)
    return router


async def test_a_pick_is_remembered_so_the_next_request_with_that_prefix_follows_it() -> None:
    router = _serve_router()
    replicas = [_replica("a"), _replica("b"), _replica("c")]
    first = await router.choose_replicas(replicas, _pending((11, 12, 13)))
    chosen = first[0][0].replica_id
    for _ in range(3):
        follow = await router.choose_replicas(replicas, _pending((11, 12, 99)))
        assert follow[0][0].replica_id == chosen
    others = {(await router.choose_replicas(replicas, _pending((i,))))[0][0].replica_id for i in range(20, 40)}
    assert others - {chosen}, "new prompts go to the less loaded replicas"


async def test_a_replica_busy_by_its_own_count_loses_its_prefix() -> None:
    router = _serve_router(max_imbalance=2)
    quiet = [_replica("a"), _replica("b")]
    chosen = (await router.choose_replicas(quiet, _pending((1, 2))))[0][0].replica_id
    busy = [_replica(r.replica_id, in_flight=9.0 if r.replica_id == chosen else 0.0) for r in quiet]
    ranks = await router.choose_replicas(busy, _pending((1, 2)))
    assert ranks[0][0].replica_id != chosen


async def test_a_replica_that_died_takes_its_prefixes_and_picks_with_it() -> None:
    router = _serve_router()
    router._replicas, router._replicas_list, router._replica_id_set = {}, [], set()  # Serve's own bookkeeping
    router._queue_len_gauge_last_update = {}
    replicas = [_replica("a"), _replica("b")]
    chosen = (await router.choose_replicas(replicas, _pending((11, 12, 13))))[0][0].replica_id
    assert router._policy.table.longest_match((11, 12, 13), {chosen})[0] == 3 and router._load.recent(chosen) == 1
    router.on_replica_actor_died(chosen)
    assert router._policy.table.longest_match((11, 12, 13), {chosen}) == (0, set())
    assert router._load.recent(chosen) == 0


async def test_a_body_without_a_prompt_goes_to_the_less_loaded_replica() -> None:
    router = _serve_router()
    replicas = [_replica("a", in_flight=3.0), _replica("b", in_flight=0.0)]
    for _ in range(2):
        ranks = await router.choose_replicas(replicas, _pending(None))
        assert ranks[0][0].replica_id == "b"


def test_the_serve_policy_is_importable_by_the_path_the_builder_gives_serve() -> None:
    from ray.serve.config import RequestRouterConfig

    from deployments.builder import INGRESS_PREFIX_ROUTER

    config = RequestRouterConfig(request_router_class=INGRESS_PREFIX_ROUTER)
    assert config.get_request_router_class() is IngressPrefixRouter


def test_the_builder_gives_a_router_only_to_a_model_that_may_run_more_than_one_replica() -> None:
    from config.naming import model_app_name
    from config.settings import DEFAULT_PROFILE, load_config
    from deployments.builder import build_apps

    one = {a.name: a.app for a in build_apps(load_config(DEFAULT_PROFILE, {}))}
    assert all(app._ingress_request_router is None for app in one.values())
    scaled = load_config(DEFAULT_PROFILE, {"ANKER__MODELS__0__MAX_REPLICAS": "2"})
    apps = {a.name: a.app for a in build_apps(scaled)}
    routed = model_app_name(scaled.models[0].name)
    router = apps[routed]._ingress_request_router
    assert router is not None and router._bound_deployment.name == f"Router-{scaled.models[0].name}"
    engine = apps[routed]._bound_deployment
    assert engine._deployment_config.request_router_config.request_router_class.endswith("IngressPrefixRouter")
    assert all(app._ingress_request_router is None for name, app in apps.items() if name != routed)
