"""Schemathesis against the published OpenAPI document: the real app in-process (real tokenizer logic, real billing
on SQLite, instant engine doubles), with valid and invalid requests from the document, under every check.

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

from deployments.openai.app import create_app
from deployments.tokenizer import TokenizerCore, TokenizerSpec
from tests.inprocess import CTX, inprocess_stack

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


class StackApp:
    """The in-process stack as one ASGI app. Its lifespan builds the stack on the event loop that then serves the
    requests (schemathesis's), since the billing service and the outbox belong to the loop they start on."""

    def __init__(self, core: TokenizerCore, data_dir: Path) -> None:
        self._core = core
        self._data_dir = data_dir
        self._app: Any = None
        self.key = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with self._stack():
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    @asynccontextmanager
    async def _stack(self) -> AsyncIterator[None]:
        # Limits far above what the run sends: a 429 would end a request before the paths worth exploring.
        async with inprocess_stack(self._core, self._data_dir, default_rpm=10**6, default_tpm=10**12) as stack:
            self.key = stack.key("fuzz")
            self._app = create_app(stack.openai, stack.accounts, max_body_bytes=64 * 1024)
            yield


@pytest.fixture(scope="module")
def api_schema(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    core = TokenizerCore([TokenizerSpec(n, p, CTX) for n, p in tiny_models.items()], block_size=16)
    target = StackApp(core, tmp_path_factory.mktemp("fuzz"))
    with pytest.MonkeyPatch.context() as patch:
        # grafana-client's niquests installs urllib3-future over urllib3, whose pool container has no keys(); this
        # count only decides whether to resend a request dropped on a stale keep-alive socket: none in-process.
        patch.setattr(schemathesis_requests, "_count_opened_connections", lambda session: 0)
        schema = schemathesis.openapi.from_asgi("/openapi.json", target, config=CONFIG)  # starts the stack

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
    ("unsupported_value", "best_of"): "best_of other than n (JSON Schema cannot compare two fields)",
    ("invalid_value", "n"): "a streamed request's prompts times n above 16 (nor multiply them)",
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
