"""vLLM's own OpenAI serving layer over an in-process ``AsyncLLM``: the serving objects that ``vllm serve`` builds
(chat, completions, responses, models), with the profile's reasoning and tool-call parsers and structured outputs.

It owns the translation of Anker's engine spec into vLLM's arguments, and nothing else: no HTTP routes, no keys, no
money. vLLM's request log stays off (zero data retention), and every ``generate`` passes the meter.
"""

from __future__ import annotations

import dataclasses
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.server import parser_memo
from deployments.server.metering import MeteredEngineClient
from deployments.server.vllm_start import EngineSpec, start_llm


@dataclass(frozen=True)
class EngineClientDouble:
    """A test double that stands in for the real engine client under the meter, called with it and ``kwargs``:
    named by its import path ("module.Class"), so that Ray pickles a string. Only the control-plane benchmark
    uses one (testkit.doubles.InstantOutputEngineDouble)."""

    path: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def wrap(self, client: Any) -> Any:
        return load_double(self.path)(client, **self.kwargs)


@dataclass(frozen=True)
class ServingSpec:
    """An engine replica that serves HTTP: its engine and the parsers of its checkpoint's output format."""

    engine: EngineSpec
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    engine_client_double: EngineClientDouble | None = None


def frontend_argv(spec: ServingSpec) -> list[str]:
    """The ``vllm serve`` arguments of the serving layer; engine arguments go to ``AsyncEngineArgs`` directly."""
    argv = [
        "--model",
        str(spec.engine.path),
        "--served-model-name",
        spec.engine.model,
        "--max-model-len",
        str(spec.engine.max_model_len),
        # Usage always reports prompt_tokens_details.cached_tokens, as OpenAI's does.
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",
        # JSON under a grammar (tool calls, structured outputs) comes out compact: no output budget, and no money,
        # goes on whitespace the grammar would otherwise allow anywhere. That is xgrammar's option (vLLM's default
        # backend, and one that runs on CPU as on GPU).
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]
    if spec.tool_call_parser is not None:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_call_parser]
    if spec.reasoning_parser is not None:
        argv += ["--reasoning-parser", spec.reasoning_parser]
    return argv


def frontend_args(spec: ServingSpec) -> Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(frontend_argv(spec))


def engine_args(spec: ServingSpec, args: Namespace) -> Any:
    """``AsyncEngineArgs`` from the frontend's namespace (so that both agree on the model and the parsers), with
    the spec's parallelism and engine arguments; prefix caching on, vLLM's request log off."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    # The frontend and the engine share one structured-outputs config object: the engine puts the reasoning
    # parser into it, and the frontend reads it there (to tell the engine when reasoning has ended).
    base = AsyncEngineArgs.from_cli_args(args)
    return dataclasses.replace(
        base,
        tensor_parallel_size=spec.engine.tensor_parallel_size,
        pipeline_parallel_size=spec.engine.pipeline_parallel_size,
        enable_prefix_caching=True,
        enable_log_requests=False,
        **spec.engine.engine_args,
    )


def load_double(path: str) -> Any:
    """The class at ``module.Class``: a test double named by its import path, so that Ray pickles a string."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class VllmLayer:
    """One replica's ``AsyncLLM`` and the serving objects over it. ``start`` builds them; ``state`` is what vLLM's
    handlers read (``openai_serving_chat``, ``openai_serving_completion``, ``openai_serving_responses``,
    ``openai_serving_models``)."""

    def __init__(self, spec: ServingSpec, stat_loggers: list[Any] | None = None) -> None:
        self.spec = spec
        self.args = frontend_args(spec)
        self._stat_loggers = stat_loggers or []
        self.llm: Any = None
        self.state: Any = None

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        parser_memo.install()
        self.llm = start_llm(engine_args(self.spec, self.args), self._stat_loggers)
        if self.args.structured_outputs_config.reasoning_parser != (self.spec.reasoning_parser or ""):
            raise RuntimeError("vLLM's frontend and engine disagree on the reasoning parser")
        tasks = await self.llm.get_supported_tasks()
        self.state = State()
        double = self.spec.engine_client_double
        client = self.llm if double is None else double.wrap(self.llm)
        # The meter stands in for the engine client: it has the same methods, and counts every generate.
        await init_app_state(MeteredEngineClient(client), self.state, self.args, tasks)  # type: ignore[arg-type]

    @property
    def dead(self) -> bool:
        return self.llm is not None and bool(self.llm.errored)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
