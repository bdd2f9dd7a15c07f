"""Prefix caching on the hybrid model hits on a prompt's first repeat (deployments/server/vllm_start.py).

A real vLLM engine on ``qwen3-next-tiny`` (Gated-DeltaNet beside gated attention, as in Qwen3.5), started as an
engine replica starts its own. vLLM keeps a hybrid model's recurrent state only at block bounds; with the
block size left to the CPU platform, a 1,500-token prompt's first sighting cached no state and its first repeat got
0 cached tokens (its second got 1,280).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from deployments.server.vllm_start import start_llm

PROMPT = [(i * 7919) % 500 + 10 for i in range(1500)]  # token ids inside the tiny vocabulary, no repeats nearby


async def _cached_tokens(path: Path, sends: int) -> tuple[list[int], int]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt

    args = AsyncEngineArgs(
        model=str(path),
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=2048,
        max_num_seqs=4,
        enable_prefix_caching=True,
        # A recurrent state larger than an attention block's page at the CPU platform's 128 tokens, as a real
        # hybrid model's is: the cache then aligns to a larger block than the scheduler's, which is the case the
        # fix is for. (With a bfloat16 state the tiny model's page fits in 128 tokens, and both agree anyway.)
        mamba_ssm_cache_dtype="float32",
        enable_log_requests=False,
    )
    llm = start_llm(args, [])
    try:
        cached = []
        for _ in range(sends):
            params = SamplingParams(max_tokens=2)
            outputs = [o async for o in llm.generate(TokensPrompt(prompt_token_ids=PROMPT), params, uuid.uuid4().hex)]
            assert outputs[-1].finished and outputs[-1].num_cached_tokens is not None
            cached.append(outputs[-1].num_cached_tokens)
        return cached, llm.vllm_config.cache_config.block_size
    finally:
        llm.shutdown()


def test_a_hybrid_models_first_repeat_hits_the_prefix_cache(tiny_models: dict[str, Path], vllm_cpu_env: None) -> None:
    cached, block = asyncio.run(_cached_tokens(tiny_models["qwen3-next-tiny"], sends=3))
    assert block == 256, f"the recurrent state's page sets the block: {block}"
    # The last whole block before the prompt's last token: that token is computed again on every send.
    assert cached == [0, 1280, 1280], cached
