"""The meter of one HTTP request (deployments/server/metering.py) over an engine client whose outputs the test
hands out: what is reported when the request ends before its engine request's generator is closed, or before any
engine request started."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

from deployments.server.metering import Metered, MeteredEngineClient, metering


def _output(tokens: int, finished: bool) -> Any:
    choice = SimpleNamespace(index=0, token_ids=[7] * tokens)
    return SimpleNamespace(prompt_token_ids=[1] * 12, num_cached_tokens=8, outputs=[choice], finished=finished)


class _Engine:
    """Gives one output of 3 tokens, then waits for ever (a client that leaves here cuts the stream)."""

    async def generate(self, prompt: Any, params: Any, request_id: str, **kwargs: Any) -> AsyncGenerator[Any]:
        yield _output(3, finished=False)
        await asyncio.sleep(3600)
        yield _output(1, finished=True)


def _params() -> Any:
    from vllm.sampling_params import RequestOutputKind

    return SimpleNamespace(output_kind=RequestOutputKind.DELTA, max_tokens=16, n=1)


async def _admit(prompt_tokens: int, max_output_tokens: int) -> None:
    return None


async def test_a_request_that_ends_before_its_engine_generator_closes_is_cut_off_and_billed_what_it_got() -> None:
    reports: list[Metered] = []
    client = MeteredEngineClient(_Engine())
    with metering(reports.append, _admit):
        stream = client.generate({"prompt_token_ids": [1] * 12}, _params(), "r1")
        first = await anext(stream)
        assert len(first.outputs[0].token_ids) == 3
    # The HTTP request has ended; its engine generator is still open (abandoned, as a cut stream's may be).
    [report] = reports
    assert (report.prompt_tokens, report.cached_tokens, report.output_tokens) == (12, 8, 3)
    assert report.admitted and report.generations == 1 and not report.finished
    await stream.aclose()
    assert len(reports) == 1  # reported once, when the request ended


async def test_an_admitted_request_that_started_no_engine_request_did_not_finish() -> None:
    reports: list[Metered] = []
    with metering(reports.append, _admit) as meter:
        meter.plan({"prompt_token_ids": [1] * 12}, _params())
        await meter.admission()
    [report] = reports
    assert report.admitted and report.generations == 0 and not report.finished
    assert (report.prompt_tokens, report.output_tokens) == (0, 0)
