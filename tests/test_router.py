"""The prefix-aware routing policy's decisions (deployments/router.py), driven without Ray."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from deployments.router import PrefixAwareRouter, PrefixRouting, PrefixTable, block_hashes, block_hashes_of

REPLICAS = ["a", "b", "c"]


def prompt(*parts: int, size: int = 64) -> tuple[int, ...]:
    """Block hashes of a prompt made of ``size``-token runs, one per part: equal leading parts, equal prefixes."""
    tokens = [part * 1000 + i for part in parts for i in range(size)]
    return block_hashes(tokens, 16)


def policy(max_imbalance: int = 2, max_blocks: int = 10_000) -> PrefixRouting[str]:
    return PrefixRouting(max_imbalance, max_blocks, random.Random(7))


def test_a_new_prompt_goes_to_the_less_loaded_of_two_random_replicas() -> None:
    routing = policy()
    route = routing.choose(REPLICAS, prompt(1))
    assert route.decision == "no_match"
    assert len(route.ranks) == 1 and len(route.ranks[0]) == 2 and set(route.ranks[0]) <= set(REPLICAS)
    # Over many requests every replica is offered: the fallback spreads load.
    offered = Counter(r for i in range(200) for r in routing.choose(REPLICAS, prompt(i)).ranks[0])
    assert set(offered) == set(REPLICAS)


def test_a_conversation_follows_the_replica_that_holds_its_prefix() -> None:
    routing = policy()
    routing.routed("turn-1", "b", prompt(1))
    routing.completed("turn-1")
    # Turn 2 repeats turn 1 and adds to it: the whole of turn 1 is matched on b.
    route = routing.choose(REPLICAS, prompt(1, 2))
    assert route.decision == "prefix"
    assert route.ranks[0] == ["b"]
    assert route.matched_blocks == len(prompt(1)) and route.blocks == len(prompt(1, 2))
    # If b refuses (full), Serve tries the next rank: two others, never b again.
    assert len(route.ranks) == 2 and "b" not in route.ranks[1]


def test_the_longest_prefix_wins_over_a_shorter_one() -> None:
    routing = policy()
    routing.routed("r1", "a", prompt(1))  # shares only the first part
    routing.routed("r2", "c", prompt(1, 2))  # shares two parts
    for request in ("r1", "r2"):
        routing.completed(request)
    route = routing.choose(REPLICAS, prompt(1, 2, 3))
    assert route.ranks[0] == ["c"] and route.matched_blocks == len(prompt(1, 2))


def test_among_replicas_holding_the_prefix_the_less_busy_one_is_preferred() -> None:
    routing = policy(max_imbalance=10)
    routing.routed("x1", "a", prompt(5))
    routing.routed("x2", "b", prompt(5))
    routing.routed("busy", "a", prompt(9))  # still running
    assert routing.choose(REPLICAS, prompt(5, 6)).ranks[0] == ["b"]


def test_an_overloaded_replica_loses_its_prefix_match() -> None:
    routing = policy(max_imbalance=2)
    routing.routed("first", "a", prompt(1))
    for i in range(3):  # a now has 4 in flight, the others none: 4 - 0 > 2
        routing.routed(f"load-{i}", "a", prompt(100 + i))
    route = routing.choose(REPLICAS, prompt(1, 2))
    assert route.decision == "overloaded"
    assert len(route.ranks) == 1 and len(route.ranks[0]) == 2
    # Within the threshold the match holds again.
    routing.completed("load-0")
    routing.completed("load-1")
    assert routing.choose(REPLICAS, prompt(1, 2)).ranks[0] == ["a"]


def test_in_flight_counts_follow_routed_and_completed_exactly_once() -> None:
    routing = policy()
    routing.routed("r", "a", prompt(1))
    routing.routed("r", "a", prompt(1))  # the same request reported twice is one request
    assert routing.in_flight("a") == 1
    routing.completed("r")
    routing.completed("r")
    routing.completed("never-routed")  # Serve completes requests a replica rejected, too
    assert routing.in_flight("a") == 0


def test_a_gone_replica_is_forgotten() -> None:
    routing = policy()
    routing.routed("r", "a", prompt(1))
    routing.forget("a")
    assert routing.in_flight("a") == 0 and len(routing.table) == 0
    assert routing.choose(["b", "c"], prompt(1, 2)).decision == "no_match"
    # A replica that is no longer a candidate is never chosen, even before it is forgotten.
    routing.routed("s", "b", prompt(1))
    assert routing.choose(["a", "c"], prompt(1, 2)).decision == "no_match"


def test_memory_is_bounded_and_the_least_recently_used_blocks_go_first() -> None:
    table: PrefixTable[str] = PrefixTable(max_blocks=8)
    old, recent = prompt(1), prompt(2)  # 4 blocks each
    table.insert(old, "a")
    table.insert(recent, "b")
    table.insert(old, "a")  # old is used again: now recent is the least recently used
    table.insert(prompt(3), "c")
    assert len(table) == 8
    assert table.longest_match(old, {"a", "b", "c"}) == (4, {"a"})
    assert table.longest_match(recent, {"a", "b", "c"}) == (0, set())


def test_calls_other_than_generate_are_balanced_and_never_fail() -> None:
    routing = policy()
    assert routing.choose(REPLICAS, None).decision == "other_call"
    assert routing.choose([], prompt(1)).ranks == []
    assert routing.choose(["a"], prompt(1)).ranks == [["a"]]


class _Metadata:
    def __init__(self, method: str) -> None:
        self.call_method = method


class _Pending:
    def __init__(self, method: str, **kwargs: Any) -> None:
        self.metadata = _Metadata(method)
        self.kwargs = kwargs


@pytest.mark.parametrize(
    ("method", "kwargs", "expected"),
    [
        ("generate", {"block_hashes": (1, 2)}, (1, 2)),
        ("generate", {}, ()),
        ("load", {}, None),
    ],
)
def test_the_router_reads_block_hashes_of_generate_calls_only(
    method: str, kwargs: dict[str, Any], expected: tuple[int, ...] | None
) -> None:
    assert block_hashes_of(_Pending(method, **kwargs)) == expected  # type: ignore[arg-type]
    assert block_hashes_of(None) is None


def test_the_serve_router_class_is_importable_by_the_path_the_builder_gives_serve() -> None:
    from ray.serve.config import RequestRouterConfig

    from deployments.builder import PREFIX_AWARE_ROUTER

    config = RequestRouterConfig(request_router_class=PREFIX_AWARE_ROUTER)
    assert config.get_request_router_class() is PrefixAwareRouter
