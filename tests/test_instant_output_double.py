"""InstantOutputEngineDouble: made-up outputs in the request's output kind, everything else the real client's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from deployments.server.vllm_layer import EngineClientDouble
from testkit.doubles import INSTANT_OUTPUT_ENGINE_DOUBLE, InstantOutputEngineDouble


class _Engine:
    model_config = "the real model config"

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the double must not run the engine")
        yield


def _run(kind: RequestOutputKind, max_tokens: int = 5) -> list[Any]:
    double = InstantOutputEngineDouble(_Engine(), output_tokens=7, tokens_per_delta=2)
    params = SamplingParams(max_tokens=max_tokens, output_kind=kind)

    async def collect() -> list[Any]:
        prompt = {"prompt_token_ids": list(range(40))}
        return [o async for o in double.generate(prompt, params, "r1")]

    return asyncio.run(collect())


def test_delta_outputs_add_up_to_the_budget() -> None:
    outs = _run(RequestOutputKind.DELTA)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2, 1]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].outputs[0].finish_reason == "length"
    assert outs[0].prompt_token_ids == list(range(40))
    assert outs[0].num_cached_tokens == 32


def test_cumulative_and_final_only() -> None:
    assert [len(o.outputs[0].token_ids) for o in _run(RequestOutputKind.CUMULATIVE)] == [2, 4, 5]
    final = _run(RequestOutputKind.FINAL_ONLY, max_tokens=100)
    assert len(final) == 1 and len(final[0].outputs[0].token_ids) == 7 and final[0].finished


def test_delegates_and_loads_by_path() -> None:
    settings = {"output_tokens": 3, "tokens_per_delta": 2}
    double = EngineClientDouble(INSTANT_OUTPUT_ENGINE_DOUBLE, settings).wrap(_Engine())
    assert isinstance(double, InstantOutputEngineDouble)
    assert (double.output_tokens, double.tokens_per_delta) == (3, 2)
    assert InstantOutputEngineDouble(_Engine()).model_config == "the real model config"
    with pytest.raises(TypeError):
        InstantOutputEngineDouble(_Engine())._prompt_ids(object())
