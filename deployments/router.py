"""Prefix-aware request routing for a model's engine replicas, plugged into Ray Serve's request-router extension
point.

A prompt whose beginning a replica has already computed is cheaper there: vLLM serves those blocks from its prefix
cache, which halves their price for the client (cached input) and cuts the time to the first token. HAProxy asks a
model's ingress request router (deployments/server/route.py) where to send a request; that router hashes the
prompt's blocks and asks ``IngressPrefixRouter`` for a pick. The policy remembers which replica it sent which blocks
to, and picks the replica holding the longest prefix of a prompt, unless that replica has ``max_imbalance`` more
requests in flight than the least loaded one. Otherwise it does what Ray Serve's default router does: the less
loaded of two random replicas.

``PrefixRouting`` is the policy, plain Python so that unit tests drive its decisions; ``IngressPrefixRouter`` is the
thin shell Serve calls. The memory is per router replica and approximate: vLLM may have evicted what the router
still remembers (then the request is merely uncached), and a second router replica learns on its own.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from observability import metrics

logger = logging.getLogger("ray.serve")

K = TypeVar("K", bound=Hashable)
Decision = Literal["prefix", "no_match", "overloaded", "other_call"]


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the prompt's full blocks: equal prefixes give equal leading hashes, in every process."""
    hashes: list[int] = []
    parent = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in block), digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
        parent = digest
    return tuple(hashes)


class PrefixTable(Generic[K]):
    """Which replicas were sent which prompt blocks; at most ``max_blocks`` blocks, least recently used forgotten.

    Block hashes are chained (a block's hash covers every token before it), so a block on a replica implies its whole
    prefix was computed there: a match walks the prompt's hashes from the first while some replica holds them all.
    """

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self._max_blocks = max_blocks
        self._blocks: OrderedDict[int, set[K]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def longest_match(self, hashes: Sequence[int], among: set[K]) -> tuple[int, set[K]]:
        """(blocks matched, replicas among ``among`` that hold all of them); (0, empty) when none holds the first."""
        holders = set(among)
        matched = 0
        for block in hashes:
            narrowed = holders & self._blocks.get(block, set())
            if not narrowed:
                break
            holders, matched = narrowed, matched + 1
        return (matched, holders) if matched else (0, set())

    def insert(self, hashes: Sequence[int], replica: K) -> None:
        for block in hashes:
            holders = self._blocks.get(block)
            if holders is None:
                self._blocks[block] = {replica}
            else:
                holders.add(replica)
                self._blocks.move_to_end(block)
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)

    def forget(self, replica: K) -> None:
        """Drops a replica that is gone (its cache went with it)."""
        for block in [b for b, holders in self._blocks.items() if replica in holders]:
            holders = self._blocks[block]
            holders.discard(replica)
            if not holders:
                del self._blocks[block]


@dataclass(frozen=True)
class Route(Generic[K]):
    """Replicas in order of preference (Serve tries a rank, then the next), and why; ``matched_blocks`` of the
    prompt's ``blocks`` the preferred replica already holds."""

    ranks: list[list[K]]
    decision: Decision
    matched_blocks: int = 0
    blocks: int = 0


class PrefixRouting(Generic[K]):
    """The policy: longest cached prefix unless overloaded, else the less loaded of two random replicas."""

    def __init__(self, max_imbalance: int, max_blocks: int, rng: random.Random | None = None) -> None:
        self.max_imbalance = max_imbalance
        self.table: PrefixTable[K] = PrefixTable(max_blocks)
        self._rng = rng or random.Random()

    def _two_random(self, candidates: Sequence[K], exclude: K | None = None) -> list[K]:
        pool = [c for c in candidates if c != exclude]
        return self._rng.sample(pool, min(2, len(pool)))

    def choose(self, candidates: Sequence[K], hashes: Sequence[int] | None, load: Callable[[K], int]) -> Route[K]:
        """Where to send a request; ``hashes`` None for a request with no prompt to read. ``load`` is each
        replica's requests in flight."""
        if not candidates:
            return Route([], "no_match")
        if hashes is None:
            return Route([self._two_random(candidates)], "other_call")
        matched, holders = self.table.longest_match(hashes, set(candidates))
        if not matched:
            return Route([self._two_random(candidates)], "no_match", 0, len(hashes))
        best = min(holders, key=load)
        least = min(load(c) for c in candidates)
        if load(best) - least > self.max_imbalance:
            return Route([self._two_random(candidates)], "overloaded", 0, len(hashes))
        fallback = self._two_random(candidates, exclude=best)
        return Route([[best], fallback] if fallback else [[best]], "prefix", matched, len(hashes))

    def forget(self, replica: K) -> None:
        self.table.forget(replica)


class PickLoad(Generic[K]):
    """A replica's load as a router that only picks can know it (HAProxy sends the request, and nobody tells the
    router when it ends): the larger of the replica's own count of requests in flight, as it last reported it, and
    the requests this router sent it in the last ``window_s`` seconds."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._picks: dict[K, deque[float]] = {}

    def picked(self, replica: K) -> None:
        self._picks.setdefault(replica, deque()).append(self._clock())

    def recent(self, replica: K) -> int:
        picks = self._picks.get(replica)
        if not picks:
            return 0
        horizon = self._clock() - self._window_s
        while picks and picks[0] < horizon:
            picks.popleft()
        return len(picks)

    def __call__(self, replica: K, reported: float) -> int:
        return max(int(reported), self.recent(replica))

    def forget(self, replica: K) -> None:
        self._picks.pop(replica, None)


ROUTE_HASHES = "block_hashes"  # the keyword of ``choose_replica`` that carries the prompt's block hashes


class IngressPrefixRouter(RequestRouter):
    """The policy where HAProxy asks the model application's ingress request router (deployments/server/route.py)
    which replica to send a request to. That router only picks
    (``choose_replica(block_hashes=..., _reserve=False)``): Serve then never calls ``on_request_routed`` or
    ``on_request_completed``. So this records its own pick at once, and weighs load by ``PickLoad``. Each rank is
    ordered least loaded first, since a pick takes a rank's first replica."""

    def initialize_state(
        self,
        model: str = "",
        max_imbalance: int = 8,
        max_blocks: int = 200_000,
        load_window_s: float = 10.0,
        **_: Any,
    ) -> None:
        self._model = model
        self._policy: PrefixRouting[ReplicaID] = PrefixRouting(max_imbalance, max_blocks)
        self._load: PickLoad[ReplicaID] = PickLoad(load_window_s)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id: Mapping[ReplicaID, RunningReplica] = {r.replica_id: r for r in candidate_replicas}

        def load(replica: ReplicaID) -> int:
            return self._load(replica, float(by_id[replica].routing_stats.get("in_flight", 0)))

        hashes = pending_request.kwargs.get(ROUTE_HASHES) if pending_request is not None else None
        route = self._policy.choose(list(by_id), hashes, load)
        ranks = [sorted(rank, key=load) for rank in route.ranks]
        if ranks and ranks[0]:
            if hashes:
                self._policy.table.insert(hashes, ranks[0][0])
            self._load.picked(ranks[0][0])
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        metrics.routed(self._model, route.decision, route.matched_blocks, route.blocks)
        return [[by_id[r] for r in rank] for rank in ranks]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self.curr_replicas)
        super().update_replicas(replicas)
        for gone in before - set(self.curr_replicas):
            self._forget(gone)

    def _forget(self, replica: ReplicaID) -> None:
        """A replica that died or left: its cache and its picks went with it."""
        self._policy.forget(replica)
        self._load.forget(replica)
