"""The vLLM plugin that keeps seeded requests from killing CPU engines (the end-to-end check is in the stack tests)."""

from __future__ import annotations

import torch

from deployments.vllm_cpu_seed import RewindableCpuGenerator, register


def test_plain_cpu_generators_have_no_offset() -> None:
    # The failure the plugin exists for; if torch ever adds offsets to CPU generators, the plugin can go.
    generator = torch.Generator(device="cpu")
    try:
        generator.set_offset(0)
    except RuntimeError as exc:
        assert "offset" in str(exc)
    else:  # pragma: no cover - depends on torch
        raise AssertionError("CPU generators now support offsets; revisit deployments/vllm_cpu_seed.py")


def test_rewind_restores_the_state_before_the_discarded_step() -> None:
    seeded = torch.Generator(device="cpu").manual_seed(42)
    generator = RewindableCpuGenerator.replacing(seeded)
    reference = torch.Generator(device="cpu").manual_seed(42)

    generator.save_step_state()
    torch.empty(8).exponential_(generator=generator)  # a sampled token that vLLM then discards
    generator.set_offset(generator.get_offset() - 4)  # vLLM's exact call

    kept = torch.empty(8).exponential_(generator=generator)
    assert torch.equal(kept, torch.empty(8).exponential_(generator=reference))


def test_register_converts_cpu_generators_of_new_requests() -> None:
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    register()
    register()  # vLLM may call plugins more than once per process
    state = CachedRequestState(
        req_id="r",
        prompt_token_ids=[1, 2, 3],
        mm_features=[],
        sampling_params=None,
        generator=torch.Generator(device="cpu").manual_seed(7),
        block_ids=([],),
        num_computed_tokens=0,
        output_token_ids=[],
    )
    assert isinstance(state.generator, RewindableCpuGenerator)
    reference = torch.Generator(device="cpu").manual_seed(7)
    assert torch.equal(torch.rand(4, generator=state.generator), torch.rand(4, generator=reference))
