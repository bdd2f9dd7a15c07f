"""The real stack through the official ``openai`` SDK, unchanged: both models, sync and async, streaming and not.

Everything here runs against `anker up`: HAProxy, each model's engine replicas serving the API over real vLLM
engines on the tiny models. Their template thinks unless told not to (``enable_thinking``), and random weights
never stop thinking: where a test reads the text, it asks for none.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import MODELS, Stack

pytestmark = pytest.mark.stack

# Numbered sentences, so that the byte-level BPE cannot fold repetitions: about 1,000 tokens on the tiny models.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
LONG_PROMPT = " ".join(f"Afsnit {i}: kommunen behandler personoplysninger efter forordningen." for i in range(90))


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)


def test_models_lists_both_tiny_models(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == sorted(MODELS)
    assert client.models.retrieve("qwen3-moe-tiny").id == "qwen3-moe-tiny"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_chat_non_streaming(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hej! Hvad hedder hovedstaden?"}],
        max_tokens=6,
        extra_body=NO_THINKING,
    )
    assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 6
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens is not None


@pytest.mark.parametrize("model", sorted(MODELS))
async def test_chat_streaming_with_usage(aclient: openai.AsyncOpenAI, model: str) -> None:
    stream = await aclient.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Skriv et digt om havet."}],
        max_tokens=8,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_THINKING,
    )
    text = {0: "", 1: ""}
    finish = {}
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert set(finish) == {0, 1}, finish
    # Random weights may give a choice only tokens that are not text (the end of text, a special token): it says
    # nothing, and still finishes. What the model writes is not what this test measures; the stream's framing is.
    assert any(text.values()), (text, finish)
    assert usage is not None and 0 < usage.completion_tokens <= 16
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens is not None


async def test_async_concurrent_requests_on_both_models(aclient: openai.AsyncOpenAI) -> None:
    async def one(model: str, i: int) -> int:
        r = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Spørgsmål nummer {i}"}], max_tokens=4
        )
        assert r.usage is not None
        return r.usage.completion_tokens

    counts = await asyncio.gather(*(one(m, i) for i in range(4) for m in MODELS))
    assert all(0 < c <= 4 for c in counts)


def test_completions_batch_and_token_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(model="qwen3-moe-tiny", prompt=["Ræven løb", "Blåbærgrød"], max_tokens=3, n=2)
    assert r.object == "text_completion" and sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage is not None and r.usage.prompt_tokens > 2 and r.usage.completion_tokens <= 12
    tokens = client.completions.create(model="qwen3-next-tiny", prompt=[[10, 11, 12], [13, 14]], max_tokens=2)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 5 and len(tokens.choices) == 2


def test_completions_streaming(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="qwen3-next-tiny",
        prompt="Blåbærgrød med fløde",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 5
    assert any(c.choices and c.choices[0].finish_reason for c in chunks[:-1])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_repeated_long_prompt_reports_cached_tokens(client: openai.OpenAI, model: str) -> None:
    # Both hit on the first repeat, the hybrid (Gated-DeltaNet) model too: it keeps its recurrent state at block
    # bounds, and the engine holds one block size for its scheduler and its cache (deployments/server/vllm_start.py).
    messages = [{"role": "system", "content": LONG_PROMPT + model}, {"role": "user", "content": "Opsummer."}]
    cached = []
    for _ in range(3):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
        assert r.usage is not None and r.usage.prompt_tokens > 500
        cached.append(r.usage.prompt_tokens_details.cached_tokens)  # type: ignore[union-attr]
        assert cached[-1] <= r.usage.prompt_tokens
    assert cached[0] == 0, "the first sighting of a fresh prompt cannot be cached"
    assert cached[1] > 256, f"a repeated long prompt must hit the prefix cache on its first repeat: {cached}"
    assert cached[2] == cached[1], f"the first repeat must hit as much as later ones: {cached}"


def test_one_organisation_cannot_hit_anothers_prefix_cache(client: openai.OpenAI, stack: Stack) -> None:
    """The prefix cache is per organisation: another one sending the very same prompt is never told (by cached
    tokens, or by a faster first token) that it was cached, while the first keeps hitting its own cache."""
    other = openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=stack.new_key("other-kommune"), max_retries=0, timeout=120
    )
    model = "qwen3-moe-tiny"  # attention only: a repeat hits the cache at once
    messages = [{"role": "system", "content": LONG_PROMPT + "isolation"}, {"role": "user", "content": "Opsummer."}]

    def cached(c: openai.OpenAI) -> int:
        r = c.chat.completions.create(model=model, messages=messages, max_tokens=2)
        return r.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr,return-value]

    first = [cached(client) for _ in range(3)]
    assert first[-1] > 256, f"the first organisation's repeats must hit its cache: {first}"
    assert cached(other) == 0, "another organisation's identical prompt was served from the first one's cache"
    assert cached(client) > 256


def test_greedy_is_deterministic_and_max_tokens_is_respected(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="qwen3-moe-tiny",
        messages=[{"role": "user", "content": "Tæl til ti."}],
        max_tokens=7,
        temperature=0.0,
        extra_body=NO_THINKING,
    )
    a = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert a.choices[0].message.content and a.choices[0].message.content == b.choices[0].message.content
    if a.choices[0].finish_reason == "length":
        assert a.usage.completion_tokens == 7


def test_stop_sequence_ends_the_completion(client: openai.OpenAI) -> None:
    base = dict(model="qwen3-moe-tiny", prompt=[5, 6, 7, 8], max_tokens=24, temperature=1.0, seed=11)
    full = client.completions.create(**base).choices[0].text  # type: ignore[call-overload]
    stop = next((full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].strip()), None)
    assert stop is not None, f"the seeded completion is too short to pick a stop string from: {full!r}"
    cut = client.completions.create(**base, stop=[stop]).choices[0]  # type: ignore[call-overload]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_sampling_parameters_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="qwen3-next-tiny",
        messages=[{"role": "user", "content": "Hej"}],
        max_completion_tokens=4,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="end-user-1",
        logprobs=True,
        top_logprobs=3,
    )
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0.0 for t in logprobs.content)


def test_errors_surface_as_the_sdks_exceptions(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="qwen3-next-tiny", messages=[{"role": "user", "content": LONG_PROMPT * 4}])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as unsupported:  # an engine control no tenant may set
        client.chat.completions.create(
            model="qwen3-next-tiny", messages=[{"role": "user", "content": "x"}], extra_body={"cache_salt": "x"}
        )
    assert (unsupported.value.code, unsupported.value.param) == ("unsupported_parameter", "cache_salt")
    bad = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="ank_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
