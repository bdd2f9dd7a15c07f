"""A model application's ingress request router: HAProxy asks it, at ``POST /internal/route`` with the request's
body (``RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY``), which of the model's engine replicas serves a request.

It renders the prompt as the replica will (the model's chat template), hashes its token blocks
(``deployments.router.block_hashes``), and lets the engine deployment's ``IngressPrefixRouter``
(deployments/router.py) pick the replica that holds the longest prefix, unless that one is too busy. The builder
attaches it (Serve's ``_with_ingress_request_router``) only to a model that may run more than one replica: with one,
HAProxy sends every request straight to it.

It never answers the client and never judges the request. A body it cannot read (not JSON, cut short by HAProxy's
buffer, a conversation the template refuses) is routed by load alone, and the replica answers the client's mistake.
Nothing of a body reaches a log, a span or an error.

Organisations: HAProxy forwards none of the client's headers to the router, so it sees no key. Its hashes are the
prompt's alone; each organisation's cache stays its own on the replica, by vLLM's ``cache_salt`` (gate.py). Two
organisations that send the same prefix are routed alike, and the second still computes it. A ``prompt_cache_key``
groups requests: its own first block, then the prompt's blocks mixed with it.

Contract (Ray's ``ingress_request_router.lua.tmpl``): 200 ``{"replica_id": "<the replica's actor name>"}``. Any other
status is a routing failure, which HAProxy answers with 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import ReplicaID
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from deployments.router import ROUTE_HASHES, block_hashes

ROUTE_PATH = "/internal/route"
Hashes = tuple[int, ...]
# The head of the rendered prompt that routing reads: enough to tell conversations, documents and system prompts
# apart, and a bounded cost (about 8 ms of tokenizing here); a 4 MB prompt would take seconds, past HAProxy's wait.
MAX_ROUTED_CHARS = 16 * 1024
MAX_ROUTED_TOKENS = MAX_ROUTED_CHARS // 2


@dataclass(frozen=True)
class RouteSpec:
    """What a model's ingress request router needs: the model's tokenizer and the routing block size."""

    tokenizer_path: Path
    block_size: int
    max_body_bytes: int  # a larger body is the replica's to refuse (413): not read here
    timeout_s: float = 4.0  # for a pick, within HAProxy's 5 s wait for the router (then it answers 503 itself)


def _cache_key_mix(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"anker-cache-key").digest()
    return int.from_bytes(digest, "little")


def _messages(data: dict[str, Any]) -> list[Any] | None:
    """The conversation of a chat completion, or of a Responses request (its ``instructions`` and its ``input``:
    a text, or the items that are messages)."""
    messages = data.get("messages")
    if isinstance(messages, list):
        return messages
    given = data.get("input")
    if isinstance(given, str):
        items: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list):
        items = [item for item in given if isinstance(item, dict) and "role" in item]
    else:
        return None
    instructions = data.get("instructions")
    if isinstance(instructions, str) and instructions:
        items.insert(0, {"role": "system", "content": instructions})
    return items


class PromptBlocks:
    """A request body's prompt as chained block hashes, as far as the body allows; None when it holds no prompt
    this can read."""

    def __init__(self, tokenizer_path: Path, block_size: int, max_body_bytes: int) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        self._block_size = block_size
        self._max_body_bytes = max_body_bytes

    def __call__(self, body: bytes) -> Hashes | None:
        if len(body) > self._max_body_bytes:
            return None
        try:
            data = json.loads(body)
        except ValueError:  # not JSON, or cut short by HAProxy's buffer
            return None
        if not isinstance(data, dict):
            return None
        try:
            token_ids = self._token_ids(data)
        except Exception:  # the template or the tokenizer refused it: the replica answers that mistake
            return None
        if not token_ids:
            return None
        hashes = block_hashes(token_ids, self._block_size)
        key = data.get("prompt_cache_key")
        if isinstance(key, str) and key:
            mix = _cache_key_mix(key)
            return (mix, *(h ^ mix for h in hashes))
        return hashes

    def _token_ids(self, data: dict[str, Any]) -> Sequence[int] | None:
        messages = _messages(data)
        if messages:
            tools = data.get("tools") if "messages" in data else None  # the Responses API's tools have another shape
            rendered = self._tokenizer.apply_chat_template(
                messages,
                tools=tools if isinstance(tools, list) and tools else None,
                add_generation_prompt=True,
                tokenize=False,
            )
            return self._head(rendered) if isinstance(rendered, str) else None
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of prompts: the first decides
        if isinstance(prompt, str):
            return self._head(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt[:MAX_ROUTED_TOKENS]
        return None

    def _head(self, text: str) -> list[int]:
        """The tokens of the text's head: a prefix of the text's tokens, but for the last few at the cut."""
        return list(self._tokenizer.encode(text[:MAX_ROUTED_CHARS], add_special_tokens=False))


Pick = Callable[[Hashes | None], Awaitable[str]]


class RouteApp:
    """The router's ASGI app: ``POST /internal/route`` answers the replica ``pick`` chose for the body's prompt."""

    def __init__(self, blocks: Callable[[bytes], Hashes | None], pick: Pick, timeout_s: float) -> None:
        self._blocks = blocks
        self._pick = pick
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        response = await self._answer(Request(scope, receive))
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        if request.url.path != ROUTE_PATH:
            return JSONResponse({"detail": "not found"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"detail": "method not allowed"}, status_code=405)
        hashes = self._blocks(await request.body())
        try:
            replica = await asyncio.wait_for(self._pick(hashes), self._timeout_s)
        except (TimeoutError, DeploymentUnavailableError):
            return JSONResponse({"detail": "no replica of the model is available"}, status_code=503)
        return JSONResponse({"replica_id": replica})


@serve.deployment(name="Router")
@serve.ingress()
class IngressRouter:
    """The deployment around ``RouteApp``; its options (name, resources) come from the builder."""

    def __init__(self, engine: DeploymentHandle, spec: RouteSpec) -> None:
        self._engine = engine
        self._spec = spec

    async def __serve_build_asgi_app__(self) -> Any:
        spec = self._spec
        blocks = await asyncio.to_thread(PromptBlocks, spec.tokenizer_path, spec.block_size, spec.max_body_bytes)
        return RouteApp(blocks, self._pick, self._spec.timeout_s)

    async def _pick(self, hashes: Hashes | None) -> str:
        # Only a pick: HAProxy sends the request, so no slot is reserved on the replica.
        async with self._engine.choose_replica(**{ROUTE_HASHES: hashes, "_reserve": False}) as selection:
            return ReplicaID(selection.replica_id, self._engine.deployment_id).to_full_id_str()
