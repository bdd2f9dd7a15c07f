"""Schemathesis against the published OpenAPI document, as HAProxy serves it at one base URL: the generation routes
on an engine replica's door over vLLM's serving layer (the tiny Qwen3-MoE), the rest on the control application,
both over one real billing on SQLite; valid and invalid requests from the document, under every check.

What this measures is the API, not generation: ``InstantOutputEngineDouble`` answers each ``generate`` with a few
made-up tokens at once (a schema-valid ``max_tokens`` may ask for the whole context, which a CPU engine takes
minutes over). vLLM's tokenizer, renderer, parsers and request checks are real; what only the engine refuses (a
grammar it cannot compile) is tested on the real engine in test_server_inprocess.py.

The run is seeded and derandomized, so it is the same run each time; ``FUZZ_EXAMPLES`` bounds its length.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import schemathesis.engine
from jsonschema import Draft202012Validator
from schemathesis import Case
from schemathesis.engine import events
from schemathesis.python import asgi
from schemathesis.transport import requests as schemathesis_requests

from deployments.openai.openapi import EXAMPLE_MODEL
from deployments.server.vllm_layer import EngineClientDouble
from testkit.doubles import INSTANT_OUTPUT_ENGINE_DOUBLE
from tests.inprocess import REPLICA_MODEL, ServingLayer, inprocess_control, inprocess_replica, serving_layer

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

FUZZ_EXAMPLES = int(os.environ.get("ANKER_FUZZ_EXAMPLES", "150"))
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": int(os.environ.get("ANKER_FUZZ_SEED", "20261124")),
        "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},  # no links between operations: nothing to chain
        "checks": {
            # Every check: server errors, status codes, content types, response schemas (SSE events too) and headers,
            # auth enforcement, unsupported methods, positive and negative data.
            "enabled": True,
            "response_schema_conformance": {"validate-formats": True},
            # A body over the limit is refused with 413 before it is parsed: as good a refusal as a 400.
            "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "413", "429"]},
            # Schema-valid requests may still be refused for what only the model or another field decides (the
            # context length, say); RUNTIME_REFUSALS below narrows these 400s down to such reasons.
            "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "429"]},
        },
    }
)


GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses")  # a replica's; HAProxy routes them there


class OneBaseUrl:
    """The replica and the control application as one ASGI app, routed by path as HAProxy routes them. Its lifespan
    builds both on the event loop that then serves the requests (schemathesis's), since billing and the outbox
    belong to the loop they start on."""

    def __init__(self, serving: ServingLayer, data_dir: Path) -> None:
        self._serving = serving
        self._data_dir = data_dir
        self._replica: Any = None
        self._control: Any = None
        self.key = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self._replica if scope["path"] in GENERATION else self._control
        await app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with self._apps():
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    @asynccontextmanager
    async def _apps(self) -> AsyncIterator[None]:
        # Limits far above what the run sends: a 429 would end a request before the paths worth exploring.
        async with (
            inprocess_replica(self._serving, self._data_dir, default_rpm=10**6, default_tpm=10**12) as replica,
            inprocess_control(self._data_dir, (REPLICA_MODEL,), replica.billing) as control,
        ):
            control.ready[REPLICA_MODEL] = True
            self.key = replica.key("fuzz")
            self._replica, self._control = replica.app, control.app
            yield


@pytest.fixture(scope="module")
async def serving(tiny_models: dict[str, Path], vllm_cpu_env: None) -> AsyncIterator[ServingLayer]:
    double = EngineClientDouble(INSTANT_OUTPUT_ENGINE_DOUBLE, {"output_tokens": 8})
    async with serving_layer(tiny_models[REPLICA_MODEL], engine_client_double=double) as layer:
        yield layer


@pytest.fixture
def api_schema(serving: ServingLayer, tmp_path: Path) -> Iterator[Any]:
    target = OneBaseUrl(serving, tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        # grafana-client's niquests installs urllib3-future over urllib3, whose pool container has no keys(); this
        # count only decides whether to resend a request dropped on a stale keep-alive socket: none in-process.
        patch.setattr(schemathesis_requests, "_count_opened_connections", lambda session: 0)
        schema = schemathesis.openapi.from_asgi("/openapi.json", target, config=CONFIG)  # starts both

        @schema.auth()
        class FuzzKey:
            def get(self, case: Case, context: Any) -> str:
                return target.key

            def set(self, case: Case, data: str, context: Any) -> None:
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

        yield schema
        asgi.shutdown_lifespans()


# (code, param) of the 400s that a request the document allows may still get, for what the document cannot state.
RUNTIME_REFUSALS: dict[tuple[str, str | None], str] = {
    ("context_length_exceeded", "messages"): "prompt and max_tokens beyond the model's context",
    ("context_length_exceeded", "prompt"): "prompt and max_tokens beyond the model's context",
    ("invalid_value", "prompt"): "token ids beyond the model's vocabulary",
    ("invalid_value", "logit_bias"): "token ids beyond the model's vocabulary",
    ("unsupported_value", "best_of"): "best_of other than n (JSON Schema cannot compare two fields)",
    ("invalid_value", "n"): "a streamed request's prompts times n above 16 (nor multiply them)",
    ("invalid_value", "max_tokens"): "max_tokens beyond what the prompt leaves of the model's context",
    ("invalid_value", "max_completion_tokens"): "max_tokens beyond what the prompt leaves of the model's context",
    ("invalid_value", "max_output_tokens"): "max_tokens beyond what the prompt leaves of the model's context",
    ("invalid_value", "response_format"): "a JSON Schema the grammar compiler does not take",
    ("unsupported_value", "messages"): "an image for a model that reads none",
    ("unsupported_value", "input"): "an image for a model that reads none",
    ("invalid_value", "stream_options"): "stream_options without stream (nor relate two fields)",
    ("invalid_value", "top_logprobs"): "top_logprobs without logprobs (nor relate two fields)",
    ("invalid_value", "tool_choice"): "a tool_choice that names no tool in tools (nor relate two fields)",
    ("invalid_value", "end"): "a range that ends before it starts",
    ("invalid_value", "end_time"): "a range that ends before it starts",
}


@dataclass
class RunReport:
    """What the run found: problems by kind (one example each) and the statuses each operation answered."""

    document: dict[str, Any]
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    modes: Counter[str] = field(default_factory=Counter)

    def allowed(self, case: Case) -> bool:
        """Whether the document allows the request: by its body's schema where it has one (generated values may
        be replaced by constants from the app's code, which the case's positive mode does not account for)."""
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return False
        content = case.operation.definition.raw.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            return True
        schema = {**self.document, "$ref": content["application/json"]["schema"]["$ref"]}
        return Draft202012Validator(schema).is_valid(case.body)

    def scenario(self, recorder: Any) -> None:
        for case_id, interaction in recorder.interactions.items():
            response = interaction.response
            if response is None or case_id not in recorder.cases:
                continue
            case = recorder.cases[case_id].value
            self.statuses[recorder.label][response.status_code] += 1
            self.modes[case.meta.generation.mode.value if case.meta else "-"] += 1
            if response.status_code == 400 and self.allowed(case):
                error = response.json()["error"]
                if (error["code"], error["param"]) not in RUNTIME_REFUSALS:
                    kind = f"{recorder.label}: a valid request refused ({error['code']}, {error['param']})"
                    self.problems[kind].append(f"{error['message']}\n{case.as_curl_command()}")
        for checks in recorder.checks.values():
            for check in checks:
                if check.failure_info is not None:
                    failure = check.failure_info.failure
                    kind = f"{recorder.label}: {check.name}: {failure.title}"
                    self.problems[kind].append(f"{failure.message}\n{check.failure_info.code_sample}")

    def error(self, label: str, title: str, detail: str) -> None:
        self.problems[f"{label}: {title}"].append(detail)

    def summary(self) -> str:
        return "\n\n".join(f"{kind} (x{len(found)}), e.g.:\n{found[0]}" for kind, found in self.problems.items())


def test_api_conforms_to_its_document(api_schema: Any) -> None:
    # The document's examples name the model the replica serves: the examples are how the run reaches a 200.
    assert EXAMPLE_MODEL == REPLICA_MODEL
    report = RunReport(api_schema.raw_schema)
    for event in schemathesis.engine.from_schema(api_schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            report.scenario(event.recorder)
        elif isinstance(event, events.NonFatalError):
            report.error(event.label, event.info.title, f"{event.info.message}\n{event.info.traceback}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    print(f"schemathesis: {dict(report.modes)}", {label: dict(seen) for label, seen in report.statuses.items()})
    assert not report.problems, report.summary()
    for operation in api_schema.get_all_operations():
        label = operation.ok().label
        seen = report.statuses[label]
        # Not a run that only ever met a closed door: every operation answered well and refused badly.
        assert any(200 <= s < 300 for s in seen) and any(400 <= s < 500 for s in seen), (label, dict(seen))
