"""The prefix-aware routing policy's decisions (deployments/router.py), driven without Ray."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from deployments.router import PrefixRouting, PrefixTable, block_hashes

REPLICAS = ["a", "b", "c"]


def prompt(*parts: int, size: int = 64) -> tuple[int, ...]:
    """Block hashes of a prompt made of ``size``-token runs, one per part: equal leading parts, equal prefixes."""
    tokens = [part * 1000 + i for part in parts for i in range(size)]
    return block_hashes(tokens, 16)


def policy(max_imbalance: int = 2, max_blocks: int = 10_000) -> PrefixRouting[str]:
    return PrefixRouting(max_imbalance, max_blocks, random.Random(7))


def loads(**in_flight: int) -> Callable[[str], int]:
    """Each replica's requests in flight, as the router is told them; 0 for one not named."""
    return lambda replica: in_flight.get(replica, 0)


IDLE = loads()


def test_a_new_prompt_goes_to_the_less_loaded_of_two_random_replicas() -> None:
    routing = policy()
    route = routing.choose(REPLICAS, prompt(1), IDLE)
    assert route.decision == "no_match"
    assert len(route.ranks) == 1 and len(route.ranks[0]) == 2 and set(route.ranks[0]) <= set(REPLICAS)
    # Over many requests every replica is offered: the fallback spreads load.
    offered = Counter(r for i in range(200) for r in routing.choose(REPLICAS, prompt(i), IDLE).ranks[0])
    assert set(offered) == set(REPLICAS)


def test_a_conversation_follows_the_replica_that_holds_its_prefix() -> None:
    routing = policy()
    routing.table.insert(prompt(1), "b")
    # Turn 2 repeats turn 1 and adds to it: the whole of turn 1 is matched on b.
    route = routing.choose(REPLICAS, prompt(1, 2), IDLE)
    assert route.decision == "prefix"
    assert route.ranks[0] == ["b"]
    assert route.matched_blocks == len(prompt(1)) and route.blocks == len(prompt(1, 2))
    # If b refuses (full), Serve tries the next rank: two others, never b again.
    assert len(route.ranks) == 2 and "b" not in route.ranks[1]


def test_the_longest_prefix_wins_over_a_shorter_one() -> None:
    routing = policy()
    routing.table.insert(prompt(1), "a")  # shares only the first part
    routing.table.insert(prompt(1, 2), "c")  # shares two parts
    route = routing.choose(REPLICAS, prompt(1, 2, 3), IDLE)
    assert route.ranks[0] == ["c"] and route.matched_blocks == len(prompt(1, 2))


def test_among_replicas_holding_the_prefix_the_less_busy_one_is_preferred() -> None:
    routing = policy(max_imbalance=10)
    routing.table.insert(prompt(5), "a")
    routing.table.insert(prompt(5), "b")
    assert routing.choose(REPLICAS, prompt(5, 6), loads(a=1)).ranks[0] == ["b"]
    assert routing.choose(REPLICAS, prompt(5, 6), loads(b=1)).ranks[0] == ["a"]


def test_an_overloaded_replica_loses_its_prefix_match() -> None:
    routing = policy(max_imbalance=2)
    routing.table.insert(prompt(1), "a")
    route = routing.choose(REPLICAS, prompt(1, 2), loads(a=4))  # 4 - 0 > 2
    assert route.decision == "overloaded"
    assert len(route.ranks) == 1 and len(route.ranks[0]) == 2
    # Within the threshold the match holds; the imbalance is to the least loaded replica, not to zero.
    assert routing.choose(REPLICAS, prompt(1, 2), loads(a=2)).ranks[0] == ["a"]
    assert routing.choose(REPLICAS, prompt(1, 2), loads(a=6, b=4, c=5)).ranks[0] == ["a"]


def test_a_gone_replica_is_forgotten() -> None:
    routing = policy()
    routing.table.insert(prompt(1), "a")
    routing.forget("a")
    assert len(routing.table) == 0
    assert routing.choose(["b", "c"], prompt(1, 2), IDLE).decision == "no_match"
    # A replica that is no longer a candidate is never chosen, even before it is forgotten.
    routing.table.insert(prompt(1), "b")
    assert routing.choose(["a", "c"], prompt(1, 2), IDLE).decision == "no_match"


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


def test_a_request_with_no_prompt_is_balanced_and_no_candidate_never_fails() -> None:
    routing = policy()
    assert routing.choose(REPLICAS, None, IDLE).decision == "other_call"
    assert routing.choose([], prompt(1), IDLE).ranks == []
    assert routing.choose(["a"], prompt(1), IDLE).ranks == [["a"]]
