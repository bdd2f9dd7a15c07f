"""vLLM general plugin that makes seeded sampling safe on CPU engines.

vLLM rewinds a request's torch generator with ``set_offset`` when it discards a token sampled during a chunked
prefill; CPU generators have no offset, so one request with ``seed`` killed the whole engine core. This plugin gives
CPU requests a generator that rewinds by restoring the state saved before the step's sampling. It must not change
anything on GPU engines, and it must stay harmless when vLLM's internals move (it then does nothing and says so).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_anker_cpu_seed_patched"


class RewindableCpuGenerator(torch.Generator):
    """A CPU generator whose offset API undoes the last sampling step instead of raising.

    vLLM's only use of the offset API is ``gen.set_offset(gen.get_offset() - 4)`` right after a sampling step whose
    token is discarded, so "set any offset" here means "restore the state saved before that step".
    """

    def __init__(self, device: str = "cpu") -> None:
        # torch.Generator is built by its __new__ from ``device``; object.__init__ takes no arguments.
        self._state_before_step: torch.Tensor | None = None

    @classmethod
    def replacing(cls, generator: torch.Generator) -> RewindableCpuGenerator:
        replacement = cls("cpu")
        replacement.set_state(generator.get_state())
        return replacement

    def save_step_state(self) -> None:
        self._state_before_step = self.get_state()

    def get_offset(self) -> int:  # type: ignore[override]
        return 0

    def set_offset(self, offset: int) -> None:  # type: ignore[override]
        if self._state_before_step is not None:
            self.set_state(self._state_before_step)


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group; vLLM calls it in every process, maybe more than once."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.worker import gpu_input_batch, gpu_model_runner
    except ImportError:  # vLLM absent or reorganised: nothing to patch
        return

    state_cls: Any = getattr(gpu_input_batch, "CachedRequestState", None)
    runner_cls: Any = getattr(gpu_model_runner, "GPUModelRunner", None)
    if state_cls is None or runner_cls is None or not hasattr(runner_cls, "_sample"):
        logger.warning("anker: vLLM internals changed; seeded sampling on CPU is not patched")
        return
    if getattr(runner_cls, _PATCHED_ATTR, False):
        return

    original_post_init = state_cls.__post_init__
    original_sample = runner_cls._sample

    def __post_init__(self: Any) -> None:
        original_post_init(self)
        generator = self.generator
        if (
            generator is not None
            and generator.device.type == "cpu"
            and not isinstance(generator, RewindableCpuGenerator)
        ):
            self.generator = RewindableCpuGenerator.replacing(generator)

    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        for generator in self.input_batch.generators.values():
            if isinstance(generator, RewindableCpuGenerator):
                generator.save_step_state()
        return original_sample(self, *args, **kwargs)

    state_cls.__post_init__ = __post_init__
    runner_cls._sample = _sample
    setattr(runner_cls, _PATCHED_ATTR, True)
